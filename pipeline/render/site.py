"""The static HTML report of a run: opens from disk, works offline, no server.

    index.html                  the run: summary, search box, the layers with their sheets,
                                the sparsity figure, per-image sheets, other stages' sheets,
                                skipped images, the resolved config
    report/<layer>.html         one page per layer: every unit as a lazy-loaded thumbnail;
                                a click (or #u<unit> in the address) opens the unit's card;
                                a dissected layer adds its unique detectors per category
                                and the table of its detector units (render.dissection)

Keys on a layer page: ArrowRight / ArrowLeft the next / previous unit (opens unit 0 when
no card is open), Escape closes the card, '/' focuses the search box. The search box
takes a layer name (or part of one) and/or a unit number: 'features_7 12',
'features_7_conv_0_2/12', or '12' alone: unit 12 of every layer that has one (this
page's layer first); 'class:NAME' the units most selective for a dataset class;
'concept:NAME' the units of every layer labelled with that concept by the dissect stage,
best IoU first. Enter goes to the first match.

Everything a page needs is in the page: styles and a small script inline, the layer list
as JSON in a <script type="application/json"> element, images by relative URL.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from pipeline.names import readable, shown
from pipeline.store import replacing

REPORT_DIR = "report"


def esc(value) -> str:
    """HTML text of one line: names shown readably (control characters escaped)."""
    return html.escape(shown(value), quote=True)


def script_json(value) -> str:
    """JSON to embed in a <script> element: `<`, `>` and `&` as \\u escapes, so no string
    (a label `<!--<script>`, `</script>`) can end or re-open the element."""
    text = json.dumps(value, ensure_ascii=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def raw_url(path: Path | str, base: Path) -> str:
    """Relative, percent-encoded URL of `path` from the folder `base`."""
    rel = os.path.relpath(Path(path), Path(base)).replace(os.sep, "/")
    return quote(rel)


def url(path: Path | str, base: Path) -> str:
    """raw_url, HTML-escaped for an attribute."""
    return esc(raw_url(path, base))


@dataclass
class SiteLayer:
    name: str
    stored: str
    depth: int
    shape: str
    receptive_field: str
    units: int
    sparsity: float | None
    note: str  # geometry message of a layer that cannot be mapped to input patches
    sheet: Path
    preview: Path | None
    cards: dict[int, Path] = field(default_factory=dict)
    thumbs: dict[int, Path] = field(default_factory=dict)
    thumb_px: int = 64
    card_hw: tuple[int, int] = (0, 0)
    border: str = ""  # how many winners sit on the map's border, and what scan.border does
    dissection: object = None  # render.dissection.LayerDissection of a dissected layer
    dissection_figure: Path | None = None  # its unique detectors per category (PNG)

    @property
    def page_name(self) -> str:
        return f"{self.stored}.html"


@dataclass
class SiteImage:
    image_id: int
    title: str
    sheet: Path


@dataclass
class Site:
    title: str
    lead: str  # one line under the title
    facts: list[tuple[str, str]]  # (name, value) rows of the summary table
    images_line: str  # "N images scanned, M skipped."
    skipped: list[tuple[str, str]]
    layers: list[SiteLayer]
    figures: list[tuple[str, Path]]  # run figures: (title, PNG)
    images: list[SiteImage]
    images_note: str  # what is absent about per-image maps
    extras: list[tuple[str, list[tuple[str, Path]]]]  # (section, [(caption, file)])
    book: Path | None
    config: str
    notes: list[str] = field(default_factory=list)  # things absent from results.h5
    tables: list = field(default_factory=list)  # (title, note, header, rows) of run-level numbers
    # dataset class -> its most selective units [(stored layer, unit, selectivity)], best first
    class_units: dict = field(default_factory=dict)


# shared with the live viewer (pipeline.viewer.page)
CSS = """
:root { --ink: #222; --muted: #6b6b6b; --line: #ddd; --accent: #2a62a8; }
* { box-sizing: border-box; }
body { font-family: Helvetica, Arial, sans-serif; margin: 0; color: var(--ink); background: #fff; }
header.bar { position: sticky; top: 0; z-index: 5; background: #fafafa; border-bottom: 1px solid var(--line);
  padding: 0.5em 1.5em; display: flex; gap: 1em; align-items: center; flex-wrap: wrap; }
header.bar a { color: var(--accent); text-decoration: none; }
main { padding: 1em 2em 3em; max-width: 1500px; }
h1 { font-size: 1.6em; margin: 0.3em 0 0.2em; }
h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid var(--line); padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border-bottom: 1px solid var(--line); padding: 0.35em 0.8em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img.thumb { max-width: 320px; max-height: 240px; border: 1px solid #ccc; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }
.note { color: var(--muted); font-size: 0.85em; }
.search { position: relative; }
.search input { width: 32em; max-width: 90vw; padding: 0.35em 0.5em; font-size: 0.95em; }
.search ul { position: absolute; left: 0; top: 2.2em; margin: 0; padding: 0; list-style: none; background: #fff;
  border: 1px solid #bbb; min-width: 32em; max-height: 20em; overflow-y: auto; box-shadow: 0 2px 6px rgba(0,0,0,.15); }
.search ul:empty { display: none; }
.search li a { display: block; padding: 0.3em 0.6em; color: var(--ink); text-decoration: none; }
.search li a:hover, .search li.active a { background: #e8f0fb; }
.units { display: flex; flex-wrap: wrap; gap: 6px; margin-top: 1em; }
.units a { display: flex; flex-direction: column; align-items: center; text-decoration: none; color: var(--muted);
  font-size: 11px; border: 2px solid transparent; padding: 1px; }
.units a:hover, .units a.current { border-color: var(--accent); color: var(--ink); }
.units img { display: block; background: #eee; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; }
.gallery figure { margin: 0; }
.gallery figcaption { font-size: 0.85em; color: var(--muted); max-width: 320px; }
#viewer { position: fixed; inset: 0; background: rgba(20,20,20,.78); z-index: 10; display: flex;
  align-items: center; justify-content: center; }
#viewer[hidden] { display: none; }
#viewer .box { background: #fff; padding: 0.8em; max-width: 96vw; max-height: 96vh; overflow: auto;
  box-shadow: 0 4px 20px rgba(0,0,0,.4); }
#viewer .nav { display: flex; gap: 0.6em; align-items: center; margin-bottom: 0.5em; }
#viewer .nav span { flex: 1; font-weight: 600; }
#viewer img { display: block; max-width: 92vw; height: auto; }
button { font-size: 0.9em; padding: 0.25em 0.7em; cursor: pointer; }
kbd { border: 1px solid #bbb; border-radius: 3px; padding: 0 0.3em; font-size: 0.85em; background: #f6f6f6; }
"""

_SCRIPT = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("lens-data").textContent);
  var layers = data.layers;
  var here = data.here;  // stored name of this page's layer, or null on the index
  var input = document.getElementById("search");
  var list = document.getElementById("search-results");

  function norm(s) { return String(s).toLowerCase(); }

  // 'features_7 12', 'features_7_conv_0_2/12', 'features_7#12', '12' (every layer, this one first), 'features_7'
  function parse(q) {
    q = q.trim();
    var m = q.match(/^(.*?)[\s\/#:]+(\d+)$/);
    if (m) { return { layer: m[1].trim(), unit: parseInt(m[2], 10) }; }
    if (/^\d+$/.test(q)) { return { layer: "", unit: parseInt(q, 10) }; }
    return { layer: q, unit: null };
  }

  function findLayers(text) {
    if (!text) {  // a unit number alone: this page's layer first, then every other layer
      var own = layers.filter(function (l) { return l.stored === here; });
      return own.concat(layers.filter(function (l) { return l.stored !== here; }));
    }
    var t = norm(text), exact = [], prefix = [], part = [];
    layers.forEach(function (l) {
      var a = norm(l.name), b = norm(l.stored);
      if (a === t || b === t) { exact.push(l); }
      else if (a.indexOf(t) === 0 || b.indexOf(t) === 0) { prefix.push(l); }
      else if (a.indexOf(t) >= 0 || b.indexOf(t) >= 0) { part.push(l); }
    });
    return exact.concat(prefix, part);
  }

  // 'class:espresso' (or 'class espresso'): the units most selective for the classes named so;
  // 'concept:red': the units the dissect stage labelled so, every layer, best IoU first.
  // table: name -> [[layer index, unit, value]]; exact names first, then names containing the text
  function named(table, text, note, most) {
    var t = norm(text), exact = [], part = [];
    Object.keys(table || {}).forEach(function (c) {
      if (norm(c) === t) { exact.push(c); } else if (norm(c).indexOf(t) >= 0) { part.push(c); }
    });
    var out = [];
    exact.concat(part).forEach(function (c) {
      table[c].forEach(function (e) {
        var l = layers[e[0]];
        if (l.page) { out.push({ layer: l, unit: e[1], note: note(c, e[2].toFixed(2)) }); }
      });
    });
    return out.slice(0, most);
  }

  function matches(q) {
    var cls = q.trim().match(/^class[\s:]+(.+)$/i);
    if (cls) {
      return named(data.classes, cls[1].trim(), function (c, v) { return "selective for " + c + " (" + v + ")"; }, 12);
    }
    var concept = q.trim().match(/^concept[\s:]+(.+)$/i);
    if (concept) {
      return named(data.concepts, concept[1].trim(), function (c, v) { return c + " (IoU " + v + ")"; }, 50);
    }
    var p = parse(q);
    if (!p.layer && p.unit === null) { return []; }
    var out = [];
    findLayers(p.layer).forEach(function (l) {
      if (p.unit !== null) {
        if (p.unit < l.units && l.page) { out.push({ layer: l, unit: p.unit }); }
      } else {
        out.push({ layer: l, unit: null });
      }
    });
    return out.slice(0, 12);
  }

  function target(m) {
    if (!m.layer.page) { return m.layer.sheet; }
    var page = data.prefix + m.layer.page;
    return m.unit === null ? page : page + "#u" + m.unit;
  }

  function go(m) {
    if (m.layer.stored === here && m.unit !== null) {
      location.hash = "u" + m.unit;
      show(m.unit);
    } else {
      location.href = target(m);
    }
  }

  function fill() {
    var found = matches(input.value);
    list.innerHTML = "";
    found.forEach(function (m, i) {
      var li = document.createElement("li");
      if (i === 0) { li.className = "active"; }
      var a = document.createElement("a");
      a.href = target(m);
      a.textContent = m.layer.name + (m.unit === null ? "  (" + m.layer.units + " units)" : "  \u00b7 unit " + m.unit)
        + (m.note ? "  \u00b7 " + m.note : "");
      a.addEventListener("click", function (ev) { ev.preventDefault(); list.innerHTML = ""; go(m); });
      li.appendChild(a);
      list.appendChild(li);
    });
    return found;
  }

  if (input) {
    input.addEventListener("input", fill);
    input.addEventListener("keydown", function (ev) {
      if (ev.key === "Enter") {
        var found = fill();
        if (found.length) { list.innerHTML = ""; input.blur(); go(found[0]); }
        ev.preventDefault();
      } else if (ev.key === "Escape") {
        list.innerHTML = ""; input.blur();
      }
      ev.stopPropagation();
    });
  }

  // ---------------------------------------------------------------- the card viewer
  var viewer = document.getElementById("viewer");
  var current = null;
  var me = layers.filter(function (l) { return l.stored === here; })[0];

  function pad(n) { var s = String(n); while (s.length < 4) { s = "0" + s; } return s; }

  function show(unit) {
    if (!viewer || !me || unit < 0 || unit >= me.units) { return; }
    var link = document.getElementById("t" + unit);
    if (!link) { return; }
    current = unit;
    var img = document.getElementById("card");
    img.src = me.cards + pad(unit) + ".jpg";
    img.alt = "card of " + me.name + " unit " + unit;
    document.getElementById("card-title").textContent = me.name + " \u00b7 unit " + unit + " of " + me.units
      + (me.labels && me.labels[unit] ? " \u00b7 " + me.labels[unit] : "");
    viewer.hidden = false;
    var old = document.querySelector(".units a.current");
    if (old) { old.classList.remove("current"); }
    link.classList.add("current");
    link.scrollIntoView({ block: "nearest" });
  }

  function close() {
    if (!viewer) { return; }
    viewer.hidden = true;
    current = null;
    if (location.hash) { history.replaceState(null, "", location.pathname + location.search); }
  }

  function fromHash() {
    var m = location.hash.match(/^#u(\d+)$/);
    if (m) { show(parseInt(m[1], 10)); } else if (viewer && !viewer.hidden) { close(); }
  }

  function step(d) {
    if (!me) { return; }
    var next = current === null ? 0 : Math.min(me.units - 1, Math.max(0, current + d));
    show(next);  // at once: keys pressed before the hashchange event step from here
    location.hash = "u" + next;
  }

  if (viewer) {
    window.addEventListener("hashchange", fromHash);
    document.getElementById("prev").addEventListener("click", function () { step(-1); });
    document.getElementById("next").addEventListener("click", function () { step(1); });
    document.getElementById("close").addEventListener("click", close);
    viewer.addEventListener("click", function (ev) { if (ev.target === viewer) { close(); } });
    fromHash();
  }

  document.addEventListener("keydown", function (ev) {
    if (ev.target === input || ev.altKey || ev.ctrlKey || ev.metaKey) { return; }
    if (ev.key === "/" && input) { ev.preventDefault(); input.focus(); input.select(); }
    else if (ev.key === "ArrowRight" && viewer) { ev.preventDefault(); step(1); }
    else if (ev.key === "ArrowLeft" && viewer) { ev.preventDefault(); step(-1); }
    else if (ev.key === "Escape") { close(); }
  });
})();
"""


def _data_json(site: Site, out_dir: Path, page_dir: Path, here: str | None) -> str:
    layers = []
    for layer in site.layers:
        entry = {"name": layer.name, "stored": layer.stored, "units": layer.units,
                 "page": layer.page_name if layer.cards else None, "sheet": raw_url(layer.sheet, page_dir)}
        if layer.stored == here and layer.cards:
            # cards are <folder>/unit_%04d.jpg: the page builds each URL from the unit number
            folder = next(iter(layer.cards.values())).parent
            entry["cards"] = raw_url(folder, page_dir) + "/unit_"
            if layer.dissection is not None:  # the card viewer's title: the unit's concept
                entry["labels"] = {str(u): f"{shown(name)} (IoU {iou:.2f})"
                                   for u, name, _, iou in layer.dissection.detectors}
        layers.append(entry)
    prefix = "" if page_dir == out_dir / REPORT_DIR else f"{REPORT_DIR}/"
    index = {layer.stored: i for i, layer in enumerate(site.layers)}
    classes = {name: [[index[s], int(u), round(float(v), 3)] for s, u, v in units if s in index]
               for name, units in site.class_units.items()}
    return script_json({"layers": layers, "here": here, "prefix": prefix, "classes": classes,
                        "concepts": _concepts(site)})


def _concepts(site: Site) -> dict[str, list]:
    """Concept name -> its detector units [layer index, unit, IoU] over every dissected
    layer, best IoU first (the search's 'concept:NAME')."""
    found: dict[str, list] = {}
    for i, layer in enumerate(site.layers):
        if layer.dissection is not None:
            for unit, name, _, iou in layer.dissection.detectors:
                found.setdefault(shown(name), []).append([i, unit, round(iou, 3)])
    return {name: sorted(units, key=lambda e: (-e[2], e[0], e[1])) for name, units in found.items()}


def _page(title: str, body: str, data: str, bar: str, example: str, concepts: bool = False) -> str:
    hint = "class:NAME, concept:NAME" if concepts else "or class:NAME"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{CSS}</style>
</head>
<body>
<header class="bar">{bar}
<div class="search"><input id="search" type="search" autocomplete="off" spellcheck="false"
 placeholder="layer and/or unit, e.g. {esc(example)}, {hint}  (press /)"
 aria-label="search layer, unit, class{' or concept' if concepts else ''}">
<ul id="search-results"></ul></div>
</header>
<main>
{body}
</main>
<script type="application/json" id="lens-data">{data}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def _index_body(site: Site, out_dir: Path) -> str:
    rows = []
    for layer in site.layers:
        sparsity = "&ndash;" if layer.sparsity is None else f"{layer.sparsity:.3f}"
        note = f'<div class="note">{esc(layer.note)}</div>' if layer.note else ""
        if layer.cards:
            name = f'<a href="{url(out_dir / REPORT_DIR / layer.page_name, out_dir)}">{esc(layer.name)}</a>'
        else:
            name = esc(layer.name)
        preview = layer.preview or layer.sheet
        rows.append(
            f'<tr id="layer-{esc(layer.stored)}"><td class="num">{layer.depth}</td><td>{name}{note}</td>'
            f"<td>{esc(layer.shape)}</td><td>{esc(layer.receptive_field)}</td>"
            f'<td class="num">{layer.units}</td><td class="num">{sparsity}</td>'
            f'<td><a href="{url(layer.sheet, out_dir)}"><img class="thumb" loading="lazy" '
            f'src="{url(preview, out_dir)}" alt="sheet of {esc(layer.name)}"></a></td></tr>')
    facts = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in site.facts)
    skipped = ""
    if site.skipped:
        items = "".join(f"<li><code>{esc(p)}</code>: {esc(e)}</li>" for p, e in site.skipped)
        skipped = f'<h3>Skipped images</h3><ul class="skipped">{items}</ul>'
    parts = [f"<h1>{esc(site.title)}</h1>", f"<p>{esc(site.lead)}</p>",
             f'<table class="facts">{facts}</table>']
    if site.book is not None:
        parts.append(f'<p>The whole report as one PDF: <a href="{url(site.book, out_dir)}">'
                     f"{esc(site.book.name)}</a></p>")
    parts += ["<h2>Images</h2>", f'<p id="summary">{esc(site.images_line)}</p>', skipped]
    parts += ["<h2>Layers</h2>",
              '<p class="note">A layer name opens its units; a sheet opens at full size.</p>' if any(
                  layer.cards for layer in site.layers) else "",
              '<table id="layers">',
              "<thead><tr><th>depth</th><th>layer</th><th>shape</th><th>receptive field / stride</th>"
              "<th>units</th><th title=\"mean over channels of the fraction of zero activations\">sparsity</th>"
              "<th>sheet</th></tr></thead>", "<tbody>", "\n".join(rows), "</tbody>", "</table>"]
    for title, note, header, rows in site.tables:
        parts.append(f"<h2>{esc(title)}</h2><p class=\"note\">{esc(note)}</p><table>"
                     + "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>"
                     + "".join("<tr>" + "".join(f'<td class="num">{esc(v)}</td>' if i else f"<td>{esc(v)}</td>"
                                                for i, v in enumerate(row)) + "</tr>" for row in rows)
                     + "</tbody></table>")
    for title, png in site.figures:
        parts.append(f'<h2>{esc(title)}</h2><p><a href="{url(png, out_dir)}"><img class="thumb" '
                     f'style="max-width:640px;max-height:none" loading="lazy" src="{url(png, out_dir)}" '
                     f'alt="{esc(title.lower())}"></a></p>')
    parts.append('<h2 id="images">Per-image sheets</h2>')
    if site.images:
        figs = "".join(
            f'<figure><a href="{url(im.sheet, out_dir)}"><img class="thumb" loading="lazy" '
            f'src="{url(im.sheet, out_dir)}" alt="{esc(im.title)}"></a>'
            f'<figcaption>{esc(im.title)}</figcaption></figure>'
            for im in site.images)
        parts.append(f'<div class="gallery">{figs}</div>')
    if site.images_note:
        parts.append(f'<p class="note">{esc(site.images_note)}</p>')
    for section, files in site.extras:
        figs = "".join(
            f'<figure><a href="{url(p, out_dir)}"><img class="thumb" loading="lazy" src="{url(p, out_dir)}" '
            f'alt="{esc(caption)}"></a><figcaption>{esc(caption)}</figcaption></figure>'
            if p.suffix.lower() in (".png", ".jpg", ".jpeg") else
            f'<figure><a href="{url(p, out_dir)}">{esc(caption)}</a></figure>'
            for caption, p in files)
        parts.append(f'<h2>{esc(section)}</h2><div class="gallery">{figs}</div>')
    if site.notes:
        items = "".join(f"<li>{esc(n)}</li>" for n in site.notes)
        parts.append(f'<h2>Not in this run</h2><ul class="note" id="absent">{items}</ul>')
    parts.append(f"<h2>Configuration</h2><pre>{html.escape(readable(site.config))}</pre>")
    return "\n".join(p for p in parts if p)


def _layer_body(site: Site, layer: SiteLayer, index: int, out_dir: Path) -> str:
    page_dir = out_dir / REPORT_DIR
    prev_l = site.layers[index - 1] if index > 0 else None
    next_l = site.layers[index + 1] if index + 1 < len(site.layers) else None

    def link(other: SiteLayer | None, label: str) -> str:
        if other is None or not other.cards:
            return ""
        return f'<a href="{url(page_dir / other.page_name, page_dir)}">{label} {esc(other.name)}</a>'

    t = layer.thumb_px
    cells = []
    for unit in range(layer.units):
        thumb = layer.thumbs.get(unit)
        card = layer.cards.get(unit)
        if card is None:
            continue
        img = (f'<img loading="lazy" src="{url(thumb, page_dir)}" width="{t}" height="{t}" alt="unit {unit}">'
               if thumb is not None else "")
        cells.append(f'<a id="t{unit}" href="#u{unit}">{img}<span>{unit}</span></a>')
    sparsity = "" if layer.sparsity is None else f" &middot; sparsity {layer.sparsity:.3f}"
    note = f'<p class="note">{esc(layer.note)}</p>' if layer.note else ""
    if layer.border:
        note += f'<p class="note" id="border">{esc(layer.border)}</p>'
    h, w = layer.card_hw
    d = layer.dissection
    detectors = "" if d is None else (f' &middot; <a href="#dissection">{len(d.detectors)} detectors of '
                                      f'{d.concepts} concepts</a>')
    return f"""<p class="note">{link(prev_l, "&larr;")} {link(next_l, "&rarr;")}</p>
<h1>{esc(layer.name)}</h1>
<p>output {esc(layer.shape)} &middot; receptive field / stride {esc(layer.receptive_field)} &middot;
{layer.units} units{sparsity} &middot; <a href="{url(layer.sheet, page_dir)}">sheet of all units</a>{detectors}</p>
{note}
<p class="note">Click a unit for its card. <kbd>&rarr;</kbd> / <kbd>&larr;</kbd> next / previous unit,
<kbd>Esc</kbd> closes, <kbd>/</kbd> search.</p>
<div class="units" id="units">
{chr(10).join(cells)}
</div>
{_dissection_section(layer, page_dir)}
<div id="viewer" hidden role="dialog" aria-label="unit card">
<div class="box"><div class="nav"><span id="card-title"></span>
<button id="prev" type="button" title="previous unit (ArrowLeft)">&larr;</button>
<button id="next" type="button" title="next unit (ArrowRight)">&rarr;</button>
<button id="close" type="button" title="close (Escape)">&times;</button></div>
<img id="card" alt="" width="{w}" height="{h}"></div>
</div>"""


def _dissection_section(layer: SiteLayer, page_dir: Path) -> str:
    """A dissected layer's unique detectors per category and its detector units, best IoU
    first, each linked to its card ('' for a layer not dissected)."""
    d = layer.dissection
    if d is None:
        return ""
    parts = ['<h2 id="dissection">Network dissection</h2>',
             f'<p class="note">{len(d.detectors)} of {d.units} units are detectors: their best concept\'s IoU '
             f'is above {d.min_iou:g} (dissect.min_iou), over {d.images} images, each unit thresholded at its top '
             f'{100 * d.quantile:.3g} % of activations (dissect.quantile).</p>']
    if layer.dissection_figure is not None:
        parts.append(f'<p><a href="{url(layer.dissection_figure, page_dir)}"><img class="thumb" loading="lazy" '
                     f'style="max-width:560px;max-height:none" src="{url(layer.dissection_figure, page_dir)}" '
                     f'alt="unique detectors per category of {esc(layer.name)}"></a></p>')
    if d.detectors:
        rows = "".join(f'<tr><td class="num"><a href="#u{u}">{u}</a></td><td>{esc(name)}</td><td>{esc(category)}</td>'
                       f'<td class="num">{iou:.2f}</td></tr>' for u, name, category, iou in d.detectors)
        parts.append('<table id="detectors"><thead><tr><th>unit</th><th>concept</th><th>category</th>'
                     f"<th>IoU</th></tr></thead><tbody>{rows}</tbody></table>")
    return "\n".join(parts)


def write_site(site: Site, out_dir: Path) -> list[Path]:
    """Write index.html and one page per layer with cards; returns the pages (index last)."""
    out_dir = Path(out_dir)
    page_dir = out_dir / REPORT_DIR
    page_dir.mkdir(parents=True, exist_ok=True)
    example = "conv 3"
    if site.layers:
        first = next((layer for layer in site.layers if layer.cards), site.layers[0])
        example = f"{first.name.split('/')[-1]} {min(3, max(0, first.units - 1))}"
    written = []
    concepts = any(layer.dissection is not None for layer in site.layers)
    index_href = url(out_dir / "index.html", page_dir)
    for i, layer in enumerate(site.layers):
        if not layer.cards:
            continue
        bar = f'<a href="{index_href}">&#8962; {esc(site.title)}</a><strong>{esc(layer.name)}</strong>'
        page = _page(f"{esc(layer.name)} &ndash; {esc(site.title)}", _layer_body(site, layer, i, out_dir),
                     _data_json(site, out_dir, page_dir, layer.stored), bar, example, concepts)
        path = page_dir / layer.page_name
        with replacing(path) as tmp:
            tmp.write_text(page, encoding="utf-8")
        written.append(path)
    bar = f"<strong>{esc(site.title)}</strong>"
    index = out_dir / "index.html"
    with replacing(index) as tmp:
        tmp.write_text(_page(f"{esc(site.title)} &ndash; channel report", _index_body(site, out_dir),
                             _data_json(site, out_dir, out_dir, None), bar, example, concepts), encoding="utf-8")
    written.append(index)
    return written
