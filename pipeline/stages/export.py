"""`export` stage: the Deep Visualization Toolbox's precomputed unit images.

Written from results.h5 only, under <run_dir>/toolbox/ (the toolbox's
caffevis_unit_jpg_dir); the layout and the loader rules it follows are in
pipeline.render.toolbox. A part whose data is not in results.h5 (no crop, no panels, no
filter patterns) is skipped with a log line.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.render.toolbox import write_toolbox
from pipeline.stage_spec import Stage

logger = logging.getLogger(__name__)

STAGE = Stage()  # cheap and reads only results.h5: always runs


def run(ctx) -> None:
    run_dir = ctx.run_dir
    results = ctx.store.require("stages=[scan,crop,export]")
    out_dir = Path(run_dir) / "toolbox"
    written = write_toolbox(results, out_dir)
    logger.info("export: %d files under %s; toolbox settings in %s", written, out_dir, out_dir / "settings_local.py")
