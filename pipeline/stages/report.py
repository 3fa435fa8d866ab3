"""Report stage: everything a person reads about a run, rendered from results.h5 only
(`pipeline.render.report`). No model is loaded and TensorFlow is never imported, so
`stages=[report]` (or `stages=[report,export]`) on an existing run directory re-renders
without recomputing, and redraws only the parts whose inputs changed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.render.report import render_report
from pipeline.stage_spec import Stage
from pipeline.validate import card_mode

logger = logging.getLogger(__name__)

STAGE = Stage()  # rendering reads only results.h5: it always runs, and redraws only what changed


def render_inputs(store, options: dict) -> dict[str, str]:
    """A key per part of the report, from the tokens of the stages each part is drawn from
    (a token changes whenever its stage finishes again), the run record and the options."""
    import hashlib

    import pipeline

    markers = store.markers()
    stamps = {n: (store.parts / n).stat().st_mtime_ns for n in ("run.h5", "images.h5") if store.has(n)}

    def key(stages) -> str:
        items = dict(options=options, version=pipeline.__version__, parts=stamps,
                     stages={s: markers[s]["token"] for s in stages if s in markers})
        return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()

    return dict(layers=key(("scan", "crop", "panels", "filters", "dissect")),  # dissect: the cards' titles
                images=key(("cam", "occlusion", "activations")), site=key(sorted(markers)))


def run(ctx) -> None:
    cfg, run_dir = ctx.cfg, ctx.run_dir
    results = ctx.store.require("stages=[scan,crop,report]")
    rc = cfg.get("report") if hasattr(cfg, "get") else None
    options = {}
    if rc is not None:
        from omegaconf import OmegaConf

        def plain(value):
            return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value

        options = dict(cards=card_mode(rc.cards), units=plain(rc.units), pdf=bool(rc.pdf), per_image=plain(rc.per_image))
    inputs = None if cfg.get("overwrite") else render_inputs(ctx.store, options)
    files = render_report(results, Path(run_dir), **options, inputs=inputs)
    logger.info("report: %d files, open %s", len(files), Path(run_dir) / "index.html")
