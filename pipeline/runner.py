"""Runs the configured stages in the order the config lists them."""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path

import h5py

from pipeline.errors import PipelineError
from pipeline.stages import STAGES
from pipeline.store import IDENTITY_KEYS, RESULTS_FILE, fingerprint, stages_done

logger = logging.getLogger(__name__)

def run(cfg, run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise PipelineError(f"unknown stage(s) {', '.join(map(str, unknown))}: "
                            f"stages are {', '.join(STAGES)}")
    results = run_dir / RESULTS_FILE
    _check_identity(results, fingerprint(cfg, IDENTITY_KEYS), cfg.overwrite)
    for stage in cfg.stages:
        module = importlib.import_module(f"pipeline.stages.{stage}")
        if module.KEYS:
            stage_print = fingerprint(cfg, module.KEYS)
            done = stages_done(results).get(stage)
            if done == stage_print and not cfg.overwrite:
                logger.info("stage %s: already in %s for this config, skipped", stage, results)
                continue
            if done is not None and done != stage_print and not cfg.overwrite:
                raise PipelineError(
                    f"{results} holds {stage} results of a different config (keys {', '.join(module.KEYS)}): "
                    f"pass overwrite=true to recompute them, or choose a new hydra.run.dir")
        else:
            stage_print = ""
        started = time.perf_counter()
        module.run(cfg, run_dir, stage_print)
        logger.info("stage %s done in %.1f s", stage, time.perf_counter() - started)
    return results


def _check_identity(results: Path, identity: str, overwrite: bool) -> None:
    if not results.exists():
        return
    with h5py.File(results, "r") as f:
        stored = f.attrs.get("identity", identity)
    if stored != identity and not overwrite:
        raise PipelineError(f"{results} holds results of another model or dataset: choose a new "
                            f"hydra.run.dir, or pass overwrite=true to replace them")
    if stored != identity:
        results.unlink()
        logger.warning("overwrite=true: removed %s of another model or dataset", results)
