"""`ablation` stage: zero single units and measure what each costs every class.

For each layer of `ablation.layers` (default: the run's last scanned layer) and each of its
`ablation.units` (N: the N most class-selective units of the scan, else the first N; or a
list), every labelled image of the dataset goes through the model once with the unit
zeroed (pipeline.ablation). Labels are taken as the model's class indices: a model trained
on this dataset (the train stage, IDX, a filelist of class numbers). Ablating a unit barely
moves the overall accuracy but can hurt single classes, so the deltas are kept per class.

results.h5:

    ablation/image (n,) int64; ablation/label (n,) int64   the labelled images, in order
    ablation/<layer>/   attrs: name, selected ("selectivity" | "first" | "list")
      units (U,) int64
      base_correct (n,) bool; base_logit (n,) float32   the true class, intact model
      correct (n, U) bool; logit (n, U) float32         with unit u zeroed
      classes (L',) int64; count (L',) int64; base_accuracy (L',) float32
      accuracy_delta (U, L'), logit_delta (U, L') float32   per class, zeroed minus intact
      overall_delta (U,) float32                            accuracy over every image
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.config import is_sequence
from pipeline.errors import PipelineError
from pipeline.per_image import per_image_part
from pipeline.stage_spec import Stage

logger = logging.getLogger(__name__)

STAGE = Stage(keys=("model", "dataset", "layers", "ablation"), part="ablation.h5",
              needs=lambda cfg: ("scan",) if not is_sequence(cfg.ablation.units) else (),  # the most selective units
              resume=lambda cfg: {"batch_size": int(cfg.ablation.batch_size)})


def chosen_units(value, channels: int, selectivity: np.ndarray | None) -> tuple[np.ndarray, str]:
    """ablation.units -> (units, how they were chosen)."""
    if not is_sequence(value):
        n = min(int(value), channels)
        if n < 1:
            raise PipelineError("ablation.units=0: give a number of units (the most selective) or a list")
        if selectivity is None:
            return np.arange(n, dtype=np.int64), "first"
        order = np.argsort(-np.nan_to_num(selectivity, nan=-np.inf), kind="stable")
        return np.sort(order[:n]).astype(np.int64), "selectivity"
    units = sorted({int(u) for u in value})
    bad = [u for u in units if not 0 <= u < channels]
    if bad or not units:
        raise PipelineError(f"ablation.units={list(value)}: list units from 0 to {channels - 1}")
    return np.asarray(units, np.int64), "list"


def run(ctx) -> None:
    from pipeline.ablation import Ablator, class_effects, per_image_rows
    from pipeline.layers import chosen_layers
    from pipeline.preprocess import normalize

    cfg, store = ctx.cfg, ctx.store
    a = cfg.ablation
    bundle = ctx.bundle
    table = ctx.images
    ids = np.flatnonzero(table.labels >= 0)
    if not ids.size:
        raise PipelineError("ablation needs labelled images: class folders, a 'path label' list or IDX labels")
    ids = ids[:int(a.limit)] if a.limit is not None else ids
    chosen = chosen_layers(bundle.model, a.layers, bundle.renamed) if a.layers else \
        chosen_layers(bundle.model, cfg.layers, bundle.renamed)[-1:]
    store.ensure_run(cfg, bundle, table)  # the store opens below
    plans = []  # (stored key, layer name, ablator, units, how they were chosen)
    with store.open() as f:
        for key, name in chosen:
            ablator = Ablator(bundle.model, name, cfg.model.output)
            if table.labels.max() >= ablator.num_classes:
                raise PipelineError(f"ablation: dataset label {int(table.labels.max())} is beyond the model's "
                                    f"{ablator.num_classes} classes: labels must be the model's class indices")
            classes = f.get(f"layers/{key}/classes")
            selectivity = classes["selectivity_max"][()] if classes is not None else None
            units, how = chosen_units(a.units, ablator.channels, selectivity)
            plans.append((key, name, ablator, units, how))
            logger.info("ablation: %d unit(s) of %s (%s), one pass per image and unit", len(units), name, how)
    spec = bundle.preprocessing

    def compute(batch_ids, pixels):
        x, labels = normalize(pixels, spec.normalize), table.labels[batch_ids]
        rows = {"ablation/image": batch_ids.astype(np.int64), "ablation/label": labels.astype(np.int64)}
        for key, _, ablator, units, _ in plans:
            found = per_image_rows(*ablator.logits(x, units), labels)
            rows.update({f"ablation/{key}/{k}": v for k, v in found.items()})
        return rows

    with per_image_part(ctx, ids, compute, fix="dataset.path", which="labelled images") as (f, _):
        labels = f["ablation/label"][()]
        for key, name, _, units, how in plans:
            g = f[f"ablation/{key}"]
            g.attrs.update(name=name, selected=how)
            g["units"] = units
            effects = class_effects(labels, g["base_correct"][()], g["correct"][()], g["base_logit"][()],
                                    g["logit"][()])
            for field in ("classes", "count", "base_accuracy", "accuracy_delta", "logit_delta", "overall_delta"):
                g[field] = getattr(effects, field)
