"""Entry point: `python run.py [hydra overrides]`. See README.md."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402

import pipeline.config  # noqa: E402,F401  (registers the structured configs)
from pipeline.errors import PipelineError  # noqa: E402

logger = logging.getLogger("run")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg) -> None:
    from pipeline.runner import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        results = run(cfg, run_dir)
    except PipelineError as err:
        _remove_if_only_bookkeeping(run_dir)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    report = run_dir / "index.html"
    if report.exists():  # what a person opens; results.h5 is for programs
        logger.info("results in %s; the report: %s", results, report)
    else:
        logger.info("results in %s (stages=[report] draws index.html)", results)


def _remove_if_only_bookkeeping(run_dir: Path) -> None:
    """A run that failed on bad config writes nothing: drop the directory Hydra made
    for it, unless it holds results of an earlier run."""
    bookkeeping = {".hydra", ".lock", "run.log", f"{HydraConfig.get().job.name}.log"}
    if not run_dir.exists() or any(p.name not in bookkeeping for p in run_dir.iterdir()):
        return
    logging.shutdown()
    shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    from pipeline.validate import renamed_override

    if renamed := renamed_override(sys.argv[1:]):  # before Hydra makes a run directory
        print(f"error: {renamed}", file=sys.stderr)
        sys.exit(2)
    main()
