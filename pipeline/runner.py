"""Runs the configured stages in the order the config lists them."""

from __future__ import annotations

import importlib
import logging
import os
import time
from pathlib import Path

from pipeline import devices, lock
from pipeline.errors import PipelineError, StageSkipped
from pipeline.render.fonts import figure_fonts
from pipeline.stage_context import Models, StageContext
from pipeline.stages import STAGES
from pipeline.store import (IDENTITY_KEYS, RESULTS_FILE, RUN_PART, Store, disk_full, fingerprint, open_h5,
                            storage_error)
from pipeline.validate import check_config

logger = logging.getLogger(__name__)


def run(cfg, run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    check_config(cfg)
    absolute_paths(cfg)
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise PipelineError(f"unknown stage(s) {', '.join(map(str, unknown))}: "
                            f"stages are {', '.join(STAGES)}")
    devices.assign(cfg.gpus, cfg.shard)
    with lock.holding(run_dir):
        store = Store(run_dir)
        store.clean_temporaries()
        store.check(recomputed=set(cfg.stages) if cfg.overwrite else ())
        _check_identity(store, fingerprint(cfg, IDENTITY_KEYS), cfg.overwrite)
        store.mend()
        modules = {stage: importlib.import_module(f"pipeline.stages.{stage}") for stage in cfg.stages}
        declared = [(stage, modules[stage].STAGE) for stage in cfg.stages]
        check_order(cfg, declared, store.stages_done())
        if "train" in cfg.stages and "scan" in cfg.stages and cfg.model.kind != "snapshot":  # said before training
            logger.warning("stages=[...scan...] scans model=%s, not the network trained here: add model=snapshot "
                           "to scan the trained network", cfg.model.kind)
        models = Models(cfg)  # one model load serves every stage of this run
        for stage, spec in declared:
            check_order(cfg, [(stage, spec)], store.stages_done())  # an earlier stage may have been skipped
            stage_print = ""
            if spec.keys:
                stage_print = fingerprint(cfg, spec.keys)
                done = store.stages_done().get(stage)
                if done == stage_print and not cfg.overwrite:
                    logger.info("stage %s: already in %s for this config, skipped", stage, store.index)
                    continue
                if done is not None and done != stage_print and not cfg.overwrite:
                    raise PipelineError(
                        f"{store.index} holds {stage} results of a different config (keys {', '.join(spec.keys)}): "
                        f"pass overwrite=true to recompute them, or choose a new hydra.run.dir")
                store.begin(stage, recompute=done is not None)
            started = time.perf_counter()
            try:
                with figure_fonts():  # names in any script, in every stage's figures
                    modules[stage].run(StageContext(stage, spec, cfg, run_dir, stage_print, spec.depends_on(cfg),
                                                    models))
            except StageSkipped as why:
                logger.warning("stage %s skipped: %s", stage, why)
                continue
            except OSError as err:  # a write outside the store's own (report files, sheets)
                if not disk_full(err):
                    raise
                raise storage_error(err, Path(getattr(err, "filename", None) or run_dir)) from err
            finally:
                if stage == "train":  # the snapshot a model=snapshot run names may be new
                    models.forget()
            if spec.keys:
                store.finish(stage, stage_print, spec.depends_on(cfg))
            logger.info("stage %s done in %.1f s", stage, time.perf_counter() - started)
        if models.loads:
            logger.info("the model was loaded %d time(s) for the stages of this run", models.loads)
    return run_dir / RESULTS_FILE


# the users' files a run records: stored absolute, so a viewer or report started from
# another folder still finds them
PATH_KEYS = ("model.path", "model.weights_path", "model.run_dir", "dataset.path", "dataset.masks", "dataset.concepts",
             "dissect.thresholds")


def absolute_paths(cfg) -> None:
    """Make the recorded file paths of `cfg` absolute (and '~' expanded), in place."""
    from omegaconf import OmegaConf

    keys = PATH_KEYS
    if OmegaConf.select(cfg, "model.weights") not in (None, "", "imagenet"):  # keras_app: a local weights file
        keys += ("model.weights",)
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and value:
            OmegaConf.update(cfg, key, os.path.abspath(os.path.expanduser(value)))


def check_order(cfg, declared: list, done) -> None:
    """Refuse, before anything runs, a stage listed before the stages whose results it needs
    (`declared`: (stage, its Stage declaration) in the order they run; `done`: the stages the
    store holds)."""
    done = set(done)
    for stage, spec in declared:
        missing = [m for m in spec.needed(cfg) if m not in done]
        if missing:
            first = ",".join(missing)
            raise PipelineError(f"stage {stage} reads the results of {first}, which this run directory does not "
                                f"hold: list {first} before {stage} in stages (e.g. stages=[{first},{stage}])")
        done.update((stage, *spec.made(cfg)))


def _check_identity(store: Store, identity: str, overwrite: bool) -> None:
    if not store.is_run_dir():
        if store.index.exists():
            if not overwrite:
                raise PipelineError(f"{store.index} was not written by this version of cnn-lens (no parts/ "
                                    f"beside it): choose a new hydra.run.dir, or pass overwrite=true to replace it")
            store.remove_all()
        return
    with open_h5(store.parts / RUN_PART, "part file") as f:
        stored = f.attrs.get("identity", identity)
    if stored != identity and not overwrite:
        raise PipelineError(f"{store.index} holds results of another model or dataset: choose a new "
                            f"hydra.run.dir, or pass overwrite=true to replace them")
    if stored != identity:
        store.remove_all()
        logger.warning("overwrite=true: removed the results of another model or dataset in %s", store.run_dir)
