"""The viewer's one page: the static report's styles, a small inline script, no other files.

Panes, as in the Deep Visualization Toolbox: the input image and the model's top-5, the
selected layer's activations (every channel a tile; click one), and the selected unit:
its map on this image, the live deconv or guided backprop of the unit, and what the run
stored for it (top-9 patches, their panels, its filter pattern, its top images, links to
the report's card); the unit's title carries its concept and IoU where its layer was
dissected ('relu5  unit 31  ·  red (IoU 0.31)').

Keys (the toolbox's): j / l or Left / Right the previous / next unit, i / k or Up / Down
a row of tiles up / down, u / o the previous / next layer, s pattern mode (the layer's
filter patterns instead of its activations), b cycles the live backprop (off, deconv,
guided), 9 shows / hides the stored pictures, h or ? the key list.
"""

from __future__ import annotations

from pipeline.render.site import CSS

_VIEWER_CSS = """
.panes { display: grid; grid-template-columns: minmax(240px, 300px) minmax(320px, 1fr) minmax(320px, 460px);
  gap: 1.2em; align-items: start; }
.pane h2 { margin-top: 0.4em; }
#input { width: 100%; image-rendering: auto; border: 1px solid #ccc; }
#top5 { padding-left: 1.4em; font-size: 0.9em; }
#top5 li { margin: 0.15em 0; }
#tiles-wrap { position: relative; display: inline-block; max-width: 100%; }
#tiles { display: block; max-width: 100%; image-rendering: pixelated; cursor: crosshair; }
#sel { position: absolute; border: 2px solid #e0452b; pointer-events: none; box-sizing: content-box; }
#banner { background: #fff4d6; border: 1px solid #e7c66b; padding: 0.5em 1em; margin: 0.6em 0; }
#banner:empty { display: none; }
#error { color: #a32020; font-size: 0.9em; }
.pics { display: flex; flex-wrap: wrap; gap: 0.6em; }
.pics figure { margin: 0; }
.pics img { display: block; width: 200px; image-rendering: pixelated; border: 1px solid #ccc; background: #eee; }
.pics figcaption { font-size: 0.8em; color: var(--muted); }
.pics figure[hidden] { display: none; }
#help[hidden] { display: none; }
select, input[type=file] { font-size: 0.9em; }
"""

_SCRIPT = r"""
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var state = { info: null, image: null, layer: 0, unit: 0, method: "", patterns: false, stored: true,
                grid: null, busy: 0, ticket: { layer: 0, unit: 0 } };
  var METHODS = ["", "deconv", "guided"];

  function busy(d) { state.busy += d; $("unit-pane").dataset.busy = String(state.busy); }
  function api(path, opts) {
    busy(1);
    return fetch(path, opts).then(function (r) {
      return r.json().then(function (body) {
        if (!r.ok) { throw new Error(body.error || r.statusText); }
        return body;
      });
    }).finally(function () { busy(-1); });
  }
  function say(msg) { $("error").textContent = msg || ""; }
  function layer() { return state.info.layers[state.layer]; }
  function q(obj) {
    return Object.keys(obj).map(function (k) { return k + "=" + encodeURIComponent(obj[k]); }).join("&");
  }
  function show(id, src) {
    var fig = $(id).closest("figure");
    if (src) { $(id).src = src; fig.hidden = false; } else { $(id).removeAttribute("src"); fig.hidden = true; }
  }

  function start() {
    api("/api/run").then(function (info) {
      state.info = info;
      document.title = "viewer: " + info.run;
      $("title").textContent = info.model + "  \u00b7  " + info.run;
      $("banner").textContent = [info.banner, info.images_problem].filter(Boolean).join(" ");
      if (info.report) { $("report-link").href = "/run/" + info.report; $("report-link").hidden = false; }
      info.layers.forEach(function (l, i) {
        var o = document.createElement("option");
        o.value = String(i); o.textContent = l.name + "  (" + l.units + ")";
        $("layer").appendChild(o);
      });
      info.images.forEach(function (im) {
        if (!im.ok) { return; }
        var o = document.createElement("option");
        o.value = String(im.id); o.textContent = im.id + ": " + im.name;
        $("image").appendChild(o);
      });
      var first = info.images.find(function (im) { return im.ok; });
      if (!info.live) { $("upload").disabled = true; $("method").disabled = true; }
      if (first && !info.images_problem) { setImage(String(first.id)); } else { refreshLayer(); }
    }).catch(function (e) { say(e.message); });
  }

  function setImage(ref) {
    state.image = ref;
    if ($("image").querySelector('option[value="' + ref + '"]')) { $("image").value = ref; }
    api("/api/image?" + q({ image: ref })).then(function (r) {
      $("input").src = r.png;
      var ol = $("top5");
      ol.textContent = "";
      (r.top5 || []).forEach(function (p) {
        var li = document.createElement("li");
        li.textContent = p.name + "  " + (100 * p.p).toFixed(1) + "%";
        ol.appendChild(li);
      });
      $("unit-pane").dataset.image = ref;
      refreshLayer();
    }).catch(function (e) { say(e.message); });
  }

  function refreshLayer() {
    var l = layer(), t = ++state.ticket.layer;
    $("layer").value = String(state.layer);
    state.unit = Math.min(state.unit, l.units - 1);
    var want = null;
    if (state.patterns && l.pattern) { want = "/api/patterns?" + q({ layer: l.key }); }
    else if (state.info.live && state.image !== null) { want = "/api/activations?" + q({ image: state.image, layer: l.key }); }
    $("layer-title").textContent = l.name + "  " + l.shape.join("\u00d7") +
      (state.patterns && l.pattern ? "  \u00b7  filter patterns" : "");
    if (!want) {
      state.grid = null; $("tiles").removeAttribute("src"); $("sel").hidden = true;
      $("layer-note").textContent = state.patterns ? "no filter patterns for this layer (run the filters stage)"
        : "no live activations (no model or no image)";
      refreshUnit();
      return;
    }
    $("layer-note").textContent = "";
    api(want).then(function (g) {
      if (t !== state.ticket.layer) { return; }
      state.grid = g;
      $("tiles").onload = function () { place(); };
      $("tiles").src = g.png;
      $("tiles-wrap").dataset.mode = state.patterns ? "patterns" : "activations";
      refreshUnit();
    }).catch(function (e) { say(e.message); });
  }

  function place() {
    var g = state.grid, img = $("tiles"), sel = $("sel");
    if (!g || !img.naturalWidth) { sel.hidden = true; return; }
    var s = img.clientWidth / img.naturalWidth;
    var r = Math.floor(state.unit / g.cols), c = state.unit % g.cols;
    sel.style.left = ((c * (g.tile[1] + g.gap)) * s - 2) + "px";
    sel.style.top = ((r * (g.tile[0] + g.gap)) * s - 2) + "px";
    sel.style.width = (g.tile[1] * s) + "px";
    sel.style.height = (g.tile[0] * s) + "px";
    sel.hidden = false;
  }

  function refreshUnit() {
    var l = layer(), u = state.unit, t = ++state.ticket.unit;
    place();
    var pane = $("unit-pane");
    pane.dataset.layer = l.key; pane.dataset.unit = String(u);
    $("unit-title").textContent = l.name + "  unit " + u;
    if (state.info.live && state.image !== null) {
      api("/api/unit?" + q({ image: state.image, layer: l.key, unit: u, method: state.method })).then(function (r) {
        if (t !== state.ticket.unit) { return; }
        show("unit-map", r.map);
        $("unit-map-caption").textContent = "this image: max " + r.max.toPrecision(4) + " at (" + r.at.join(", ") + ")";
        show("unit-backprop", r.backprop || null);
        $("unit-backprop-caption").textContent = r.method ? "live " + r.method : "";
      }).catch(function (e) { say(e.message); });
    } else { show("unit-map", null); show("unit-backprop", null); }
    api("/api/precomputed?" + q({ layer: l.key, unit: u })).then(function (r) {
      if (t !== state.ticket.unit) { return; }
      $("unit-title").textContent = l.name + "  unit " + u + (r.concept ? "  \u00b7  " + r.concept : "");
      var on = state.stored;
      show("max-im", on ? r.max_im : null);
      show("max-deconv", on ? r.max_deconv : null);
      show("max-guided", on ? r.max_guided : null);
      show("pattern", on ? r.pattern : null);
      $("pattern-caption").textContent = "filter pattern" +
        (r.pattern_value !== undefined ? " (reaches " + r.pattern_value.toPrecision(4) + ")" : "");
      var tb = $("top-table");
      tb.textContent = "";
      (on ? r.top : []).forEach(function (e) {
        var tr = document.createElement("tr");
        [e.rank + 1, e.value.toPrecision(4), e.name, e.label].forEach(function (v, i) {
          var td = document.createElement("td"); td.textContent = String(v);
          if (i < 2) { td.className = "num"; }
          tr.appendChild(td);
        });
        tr.dataset.image = String(e.image);
        tr.title = "show this image";
        tr.onclick = function () { if (state.info.live && !state.info.images_problem) { setImage(String(e.image)); } };
        tb.appendChild(tr);
      });
      var card = $("card-link"), pg = $("page-link");
      card.hidden = !r.card; pg.hidden = !r.page;
      if (r.card) { card.href = "/run/" + r.card; }
      if (r.page) { pg.href = "/run/" + r.page; }
      $("stored").dataset.unit = String(u);
    }).catch(function (e) { say(e.message); });
  }

  function setUnit(u) {
    var n = layer().units;
    state.unit = Math.max(0, Math.min(n - 1, u));
    refreshUnit();
  }
  function setLayer(i) {
    state.layer = (i + state.info.layers.length) % state.info.layers.length;
    refreshLayer();
  }

  $("tiles").addEventListener("click", function (ev) {
    var g = state.grid, img = $("tiles");
    if (!g) { return; }
    var s = img.naturalWidth / img.clientWidth, rect = img.getBoundingClientRect();
    var x = (ev.clientX - rect.left) * s, y = (ev.clientY - rect.top) * s;
    var c = Math.floor(x / (g.tile[1] + g.gap)), r = Math.floor(y / (g.tile[0] + g.gap));
    if (c < g.cols) { setUnit(r * g.cols + c); }
  });
  $("layer").addEventListener("change", function () { setLayer(parseInt($("layer").value, 10)); });
  $("image").addEventListener("change", function () { setImage($("image").value); });
  $("method").addEventListener("change", function () { state.method = $("method").value; refreshUnit(); });
  $("patterns-button").addEventListener("click", function () { state.patterns = !state.patterns; refreshLayer(); });
  function upload(file) {
    if (!file || !state.info.live) { return; }
    say("");
    api("/api/upload", { method: "POST", body: file }).then(function (r) { setImage(r.image); })
      .catch(function (e) { say(e.message); });
  }
  $("upload").addEventListener("change", function () { upload($("upload").files[0]); });
  document.addEventListener("dragover", function (ev) { ev.preventDefault(); });
  document.addEventListener("drop", function (ev) {
    ev.preventDefault();
    if (ev.dataTransfer.files.length) { upload(ev.dataTransfer.files[0]); }
  });
  window.addEventListener("resize", place);
  document.addEventListener("keydown", function (ev) {
    var tag = (ev.target.tagName || "").toLowerCase();
    if (tag === "input" || tag === "select" || tag === "textarea" || ev.ctrlKey || ev.metaKey || ev.altKey) { return; }
    var cols = state.grid ? state.grid.cols : Math.ceil(Math.sqrt(layer().units));
    var k = ev.key, handled = true;
    if (k === "j" || k === "ArrowLeft") { setUnit(state.unit - 1); }
    else if (k === "l" || k === "ArrowRight") { setUnit(state.unit + 1); }
    else if (k === "i" || k === "ArrowUp") { setUnit(state.unit - cols); }
    else if (k === "k" || k === "ArrowDown") { setUnit(state.unit + cols); }
    else if (k === "u" || k === "U") { setLayer(state.layer - 1); }
    else if (k === "o" || k === "O") { setLayer(state.layer + 1); }
    else if (k === "s") { state.patterns = !state.patterns; refreshLayer(); }
    else if (k === "b" && state.info.live) {
      state.method = METHODS[(METHODS.indexOf(state.method) + 1) % METHODS.length];
      $("method").value = state.method; refreshUnit();
    }
    else if (k === "9") { state.stored = !state.stored; refreshUnit(); }
    else if (k === "h" || k === "?") { $("help").hidden = !$("help").hidden; }
    else { handled = false; }
    if (handled) { ev.preventDefault(); }
  });
  start();
})();
"""

_BODY = """
<header class="bar"><strong id="title">viewer</strong>
<label>layer <select id="layer" aria-label="layer"></select></label>
<label>image <select id="image" aria-label="dataset image"></select></label>
<label>upload <input id="upload" type="file" accept="image/*" aria-label="upload an image"></label>
<label>backprop <select id="method" aria-label="live backprop">
<option value="">off</option><option value="deconv">deconv</option><option value="guided">guided</option></select></label>
<button id="patterns-button" type="button" title="s">patterns</button>
<a id="report-link" hidden>static report</a>
<span class="note">keys: <kbd>h</kbd></span>
</header>
<main>
<div id="banner"></div>
<div id="error" role="alert"></div>
<div id="help" class="note" hidden>
<kbd>j</kbd>/<kbd>l</kbd> or <kbd>&larr;</kbd>/<kbd>&rarr;</kbd> previous / next unit &middot;
<kbd>i</kbd>/<kbd>k</kbd> or <kbd>&uarr;</kbd>/<kbd>&darr;</kbd> a row up / down &middot;
<kbd>u</kbd>/<kbd>o</kbd> previous / next layer &middot; <kbd>s</kbd> filter patterns &middot;
<kbd>b</kbd> live backprop off / deconv / guided &middot; <kbd>9</kbd> stored pictures &middot;
drop an image file anywhere to upload it</div>
<div class="panes">
<section class="pane" id="input-pane"><h2>input</h2>
<img id="input" alt="the model's input">
<ol id="top5"></ol></section>
<section class="pane" id="layer-pane"><h2 id="layer-title">layer</h2>
<div id="tiles-wrap"><img id="tiles" alt="every channel of the layer"><div id="sel" hidden></div></div>
<p id="layer-note" class="note"></p></section>
<section class="pane" id="unit-pane" data-busy="0"><h2 id="unit-title">unit</h2>
<div class="pics">
<figure hidden><img id="unit-map" alt="the unit's map"><figcaption id="unit-map-caption"></figcaption></figure>
<figure hidden><img id="unit-backprop" alt="live backprop"><figcaption id="unit-backprop-caption"></figcaption></figure>
</div>
<div id="stored">
<h3>stored by the run</h3>
<div class="pics">
<figure hidden><img id="max-im" alt="top 9 patches"><figcaption>top 9 patches</figcaption></figure>
<figure hidden><img id="max-deconv" alt="deconv of the top 9"><figcaption>deconv of the top 9</figcaption></figure>
<figure hidden><img id="max-guided" alt="guided backprop of the top 9"><figcaption>guided backprop of the top 9</figcaption></figure>
<figure hidden><img id="pattern" alt="filter pattern"><figcaption id="pattern-caption">filter pattern</figcaption></figure>
</div>
<table><thead><tr><th>#</th><th>value</th><th>image</th><th>label</th></tr></thead><tbody id="top-table"></tbody></table>
<p><a id="card-link" hidden target="_blank">unit card</a> <a id="page-link" hidden target="_blank">in the report</a></p>
</div></section>
</div>
</main>
"""


def page_html() -> str:
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>viewer</title>
<style>{CSS}{_VIEWER_CSS}</style>
</head>
<body>{_BODY}<script>{_SCRIPT}</script>
</body>
</html>
"""
