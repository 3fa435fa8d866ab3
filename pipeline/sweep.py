"""A Hydra callback that writes a summary table of a multirun sweep.

At the end of `python run.py -m ...` it reads every job directory of the sweep
and writes summary.csv and summary.html beside them: one row per job with the
overrides it was swept over (those every job shares are named once, above the HTML
table), what it scanned, and links to its report and results.
"""

from __future__ import annotations

import csv
import html
import json
import logging
from pathlib import Path

import h5py
import yaml
from hydra.experimental.callback import Callback

from pipeline.store import PARTS_DIR

logger = logging.getLogger(__name__)

COLUMNS = ("job", "overrides", "status", "model", "layers", "channels", "images_scanned", "images_skipped",
           "stages_done", "report", "results")


def job_overrides(job_dir: Path) -> list[str]:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    return list(yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.exists() else []


def split_overrides(per_job: list[list[str]]) -> tuple[list[str], list[str]]:
    """(the swept keys, in first-seen order; the overrides every job shares): a key is swept
    where its value differs between jobs or some job does not set it."""
    values: dict[str, list[str | None]] = {}
    for overrides in per_job:
        for item in overrides:
            values.setdefault(item.partition("=")[0], [])
    for key, seen in values.items():
        seen.extend(next((item for item in o if item.partition("=")[0] == key), None) for o in per_job)
    swept = [key for key, seen in values.items() if len(set(seen)) > 1]
    shared = [item for item in (per_job[0] if per_job else []) if item.partition("=")[0] not in swept]
    return swept, shared


def job_row(job_dir: Path, sweep_dir: Path, swept: list[str] | None = None) -> dict:
    """One job's row; `swept`: the keys whose overrides the row shows (None: all)."""
    overrides = job_overrides(job_dir)
    if swept is not None:
        overrides = [item for item in overrides if item.partition("=")[0] in swept]
    row = dict.fromkeys(COLUMNS, "")
    row.update(job=job_dir.name, overrides=" ".join(overrides), status="no results")
    results = job_dir / "results.h5"
    if results.exists():
        with h5py.File(results, "r") as f:
            layers = f["layers"] if "layers" in f else {}
            ok = f["images/ok"][()] if "images/ok" in f else []
            scanned = f["images/scanned"][()] if "images/scanned" in f else ok
            done = json.loads(f.attrs.get("stages_done", "{}"))
            unfinished = any((job_dir / PARTS_DIR).glob("*/state.h5"))  # a scan checkpoint left by a kill
            row.update(status="unfinished" if unfinished else "done",
                       model=str(f.attrs.get("model", "")), layers=len(layers),
                       channels=sum(int(layers[k].attrs["shape"][-1]) for k in layers),
                       images_scanned=int(sum(ok)), images_skipped=int(sum(scanned) - sum(ok)),
                       stages_done=" ".join(sorted(done)),
                       results=str(results.relative_to(sweep_dir)))
    if (job_dir / "index.html").exists():
        row["report"] = str((job_dir / "index.html").relative_to(sweep_dir))
    return row


def write_summary(sweep_dir: Path) -> list[Path]:
    sweep_dir = Path(sweep_dir)
    jobs = sorted((d for d in sweep_dir.iterdir() if d.is_dir() and (d / ".hydra").exists()),
                  key=lambda d: (len(d.name), d.name))
    swept, shared = split_overrides([job_overrides(d) for d in jobs])
    rows = [job_row(d, sweep_dir, swept) for d in jobs]
    csv_path, html_path = sweep_dir / "summary.csv", sweep_dir / "summary.html"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    html_path.write_text(_html(rows, sweep_dir, swept, shared))
    logger.info("sweep summary: %s, %s", csv_path, html_path)
    return [csv_path, html_path]


def _html(rows: list[dict], sweep_dir: Path, swept: list[str], shared: list[str]) -> str:
    def cell(key, value):
        value = html.escape(str(value))
        if key in ("report", "results") and value:
            return f'<td><a href="{value}">{value.rsplit("/", 1)[-1]}</a></td>'
        return f"<td>{value}</td>"

    head = "".join(f"<th>{c}</th>" for c in COLUMNS)
    body = "\n".join("<tr>" + "".join(cell(k, r[k]) for k in COLUMNS) + "</tr>" for r in rows)
    title = html.escape(f"Sweep over {', '.join(swept)}" if swept else "Sweep summary")
    jobs = f"{len(rows)} job{'s' if len(rows) != 1 else ''} in {sweep_dir.name}"
    common = html.escape(" ".join(shared))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}} th{{background:#f2f2f2}}</style></head>
<body><h1>{title}</h1><p>{html.escape(jobs)}</p>
<p id="shared">{"every job: <code>" + common + "</code>" if common else "no override shared by every job"}</p>
<table id="jobs"><tr>{head}</tr>
{body}
</table></body></html>
"""


class SweepSummary(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if sweep_dir.exists():
            write_summary(sweep_dir)
