"""results.h5: the single source of truth of a run.

Every write goes to a temporary copy that replaces the file only once it is
complete and closed, so a process killed at any moment leaves either the old
file or the new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

RESULTS_FILE = "results.h5"
STR = h5py.string_dtype("utf-8")


def stored_name(layer: str) -> str:
    """HDF5 group name of a layer: '/' (nested models) becomes '.'."""
    return layer.replace("/", ".")


# what a run directory is about: every stage's results must agree on these
IDENTITY_KEYS = ("model", "dataset")


def fingerprint(cfg, keys) -> str:
    """Hash of the config values under `keys`: equal fingerprints, equal results."""
    from omegaconf import OmegaConf

    values = {}
    for key in keys:  # dotted keys name one field of a section
        value = OmegaConf.select(cfg, key)
        values[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def transaction(path: Path):
    """Open a copy of `path` for writing; it replaces `path` only on success."""
    path = Path(path)
    _remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if path.exists():
        shutil.copyfile(path, tmp)
    try:
        with h5py.File(tmp, "a") as f:
            yield f
            f.flush()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _remove_stale_temps(path: Path) -> None:
    """Temporary copies left by killed writers (their process is gone)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, someone else's


def stages_done(path: Path) -> dict[str, str]:
    """Stage name -> fingerprint of the config it ran with."""
    if not Path(path).exists():
        return {}
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs.get("stages_done", "{}"))


def mark_done(f: h5py.File, stage: str, stage_print: str, invalidates: tuple[str, ...] = ()) -> None:
    """Record that `stage` ran with config fingerprint `stage_print`; forget the
    stages built on its previous results."""
    done = json.loads(f.attrs.get("stages_done", "{}"))
    for other in invalidates:
        done.pop(other, None)
    done[stage] = stage_print
    f.attrs["stages_done"] = json.dumps(done, sort_keys=True)


def write_run_attrs(f: h5py.File, cfg, model_name: str, spec, weights_sha256: str = "",
                    imagenet_classes: bool = False, **extra) -> None:
    """The root attrs every results.h5 carries, whichever stage creates it."""
    import dataclasses

    from omegaconf import OmegaConf

    import pipeline

    f.attrs.update(
        config=OmegaConf.to_yaml(cfg, resolve=True), identity=fingerprint(cfg, IDENTITY_KEYS), model=model_name,
        input_size=np.asarray([spec.input_size, spec.input_size], np.int64),
        preprocessing=json.dumps(dataclasses.asdict(spec), sort_keys=True), version=pipeline.__version__,
        weights_sha256=weights_sha256, imagenet_classes=imagenet_classes, **extra)


def write_image_table(f: h5py.File, table, errors: dict[int, str], scanned: np.ndarray | None = None) -> None:
    """images/*: every image of the dataset (row = global image id). `scanned` marks
    the images this run read (a shard's slice; default all); errors: id -> reason."""
    g = f.require_group("images")
    if "path" not in g:  # written once: checkpoints only update the flags
        write_strings(g, "path", table.paths)
        replace_dataset(g, "label", table.labels.astype(np.int64))
        g.attrs["class_names"] = json.dumps(list(table.class_names))
    scanned = np.ones(len(table), bool) if scanned is None else scanned
    ok = scanned.copy()
    ok[list(errors)] = False
    reasons = np.where(scanned, "", "not in this shard").astype(object)
    for i, reason in errors.items():
        reasons[i] = reason
    replace_dataset(g, "scanned", scanned)
    replace_dataset(g, "ok", ok)
    write_strings(g, "error", reasons)


def replace_dataset(group: h5py.Group, name: str, data, **kwargs) -> h5py.Dataset:
    if name in group:
        del group[name]
    return group.create_dataset(name, data=data, **kwargs)


def write_strings(group: h5py.Group, name: str, values) -> None:
    replace_dataset(group, name, np.asarray(list(values), dtype=object), dtype=STR)


def read_strings(dataset: h5py.Dataset) -> list[str]:
    return list(dataset.asstr()[()])
