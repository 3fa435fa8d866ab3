"""`train` stage: train the tutorials' small convnet from scratch on the run's dataset.

Saves the model after the chosen epochs (`snapshots/epoch_%03d.keras`), records the
training and validation curves in results.h5 (`train/`) and draws them from there
(`sheets/training_curve.png` and `.pdf`, render.training; the report draws them again).
The model config of the run plays no part: the network is built here. Later stages of
the same run (evolution, invariance) use its snapshots; other runs load one with
`model=snapshot model.run_dir=<this run>`.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.models.sources import SNAPSHOT_DIR, save_spec, snapshot_path
from pipeline.render.maps import draw_stage_figures
from pipeline.render.training import TRAINING_CURVE
from pipeline.stage_spec import Stage
from pipeline.store import write_strings

logger = logging.getLogger(__name__)

STAGE = Stage(keys=("dataset", "train"), part="train.h5")


def run(ctx) -> None:
    import json

    from pipeline import train as T

    cfg, run_dir = ctx.cfg, ctx.run_dir
    tc = cfg.train
    snapshots = T.snapshot_epochs(tc.snapshots, int(tc.epochs))
    if tc.optimizer not in T.OPTIMIZERS:
        raise PipelineError(f"train.optimizer={tc.optimizer}: use one of {', '.join(T.OPTIMIZERS)}")
    table = ctx.images
    spec = T.training_spec(table, tc.input_size, tc.input_channels)
    labelled = np.flatnonzero(table.labels >= 0)
    if len(labelled) == 0:
        raise PipelineError("the dataset has no labels to train on: use dataset=folder with one subfolder per "
                            "class, dataset=filelist with 'path label' lines, or IDX files with a labels file")
    if len(labelled) < len(table):
        logger.warning("%d of %d images have no label and are left out of training",
                       len(table) - len(labelled), len(table))
    ids, pixels, errors = T.load_pixels(table, spec, labelled, desc="load training images")
    labels = table.labels[ids]
    classes = int(table.labels.max()) + 1
    class_names = list(table.class_names) or [str(c) for c in range(classes)]
    train_ids, val_ids = T.split_ids(ids, float(tc.validation), int(tc.seed))
    position = {int(i): n for n, i in enumerate(ids)}
    tr = np.asarray([position[int(i)] for i in train_ids], np.int64)
    va = np.asarray([position[int(i)] for i in val_ids], np.int64)

    run_dir.mkdir(parents=True, exist_ok=True)
    folder = run_dir / SNAPSHOT_DIR
    if folder.exists():  # a retrain (overwrite=true): no stale epochs may survive
        shutil.rmtree(folder)
    save_spec(run_dir, spec, class_names)

    model = T.build_convnet(spec.size, spec.channels, classes, tc.filters, int(tc.dense),
                            float(tc.dropout), int(tc.seed))
    logger.info("training %s (%d parameters, input %dx%dx%d, %d classes) on %d images, validating on %d, "
                "%d epochs, snapshots after %s", model.name, model.count_params(), spec.height,
                spec.width, spec.channels, classes, len(tr), len(va), tc.epochs, snapshots)
    predicted = {}

    def on_snapshot(epoch: int) -> None:
        path = snapshot_path(run_dir, epoch)
        model.save(path)
        predicted[epoch] = T.predict_classes(model, pixels[va])
        logger.info("saved %s", path)

    started = time.perf_counter()
    history = T.train(model, pixels[tr], labels[tr], pixels[va], labels[va], epochs=int(tc.epochs),
                      batch_size=int(tc.batch_size), optimizer=tc.optimizer, lr=float(tc.lr),
                      seed=int(tc.seed), snapshots=snapshots, on_snapshot=on_snapshot)
    total = time.perf_counter() - started

    store = ctx.store
    store.write_run(cfg, f"{model.name} trained in this run", spec, table)
    store.write_images(len(table), errors)
    with store.write(ctx.spec.part) as f:
        g = f.create_group("train")
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "seconds"):
            g[key] = np.asarray(history[key], np.float32)
        g["epoch"] = np.asarray(history["epoch"], np.int64)
        g["train_ids"], g["val_ids"] = train_ids, val_ids
        g["snapshot_epoch"] = np.asarray(snapshots, np.int64)
        write_strings(g, "snapshot_file", [snapshot_path(Path("."), e).as_posix() for e in snapshots])
        g["val_predicted"] = np.stack([predicted[e] for e in snapshots]).astype(np.int64)
        g.attrs.update(model=model.name, classes=classes, class_names=json.dumps(class_names),
                       input_size=list(spec.size), channels=spec.channels, parameters=model.count_params(),
                       architecture=json.dumps(dict(filters=[int(x) for x in tc.filters], dense=int(tc.dense),
                                                    dropout=float(tc.dropout))),
                       optimizer=tc.optimizer, lr=float(tc.lr), batch_size=int(tc.batch_size),
                       seed=int(tc.seed), validation=float(tc.validation), seconds_total=total)
    draw_stage_figures(ctx.part, run_dir, "train")  # from the part: the report redraws the same
    logger.info("trained %d epochs in %.1f s; validation accuracy %.4f; curve in %s", tc.epochs, total,
                history["val_accuracy"][-1], run_dir / TRAINING_CURVE)
