"""Every number of the config checked before anything runs: one line per mistake, naming
the key, its value and what it may be."""

from __future__ import annotations

import dataclasses
import difflib

from omegaconf import DictConfig, ListConfig, OmegaConf

from pipeline.errors import PipelineError

# key -> (low, high, whole number?, null allowed?): values in [low, high]; a bound written
# as a one-element tuple is excluded: (0,) means "> 0"
RULES: dict[str, tuple] = {
    "topk": (1, None, True, False),
    "batch_size": (1, None, True, False),
    "scan.bottomk": (0, None, True, False),
    "scan.border": (0, None, True, False),
    "scan.exemplars_k": (1, None, True, False),
    "ablation.limit": (1, None, True, True),
    "ablation.units": (0, None, True, False),
    "ablation.batch_size": (1, None, True, False),
    "randomization.steps": (1, None, True, False),
    "checkpoint.seconds": ((0,), None, False, False),
    "checkpoint.batches": (1, None, True, True),
    "checkpoint.block_mb": ((0,), None, False, False),
    "dataset.limit": (1, None, True, True),
    "dataset.max_mb": ((0,), None, False, False),
    "dataset.max_pixels": (1, None, True, False),
    "shard.count": (1, None, True, False),
    "shard.index": (0, None, True, False),
    "gpus": (0, None, True, False),
    "crop.max_size": (0, None, True, False),
    "panels.batch_size": (1, None, True, False),
    "activations.grid": (1, None, True, False),
    "activations.per_row": (1, None, True, False),
    "cam.top_n": (1, None, True, False),
    "cam.scorecam_batch": (1, None, True, False),
    "cam.scorecam_channels": (1, None, True, True),
    "cam.faithfulness_steps": (0, None, True, False),
    "cam.draw": (0, None, True, True),
    "cam.alpha": (0, 1, False, False),
    "occlusion.size": (1, None, True, True),
    "occlusion.stride": (1, None, True, True),
    "occlusion.fill": (0, 255, True, False),
    "occlusion.batch_size": (1, None, True, False),
    "filters.steps": (1, None, True, False),
    "filters.size": (8, None, True, True),
    "filters.lr": ((0,), None, False, True),
    "filters.restarts": (1, None, True, False),
    "filters.batch_size": (1, None, True, False),
    "train.epochs": (1, None, True, False),
    "train.batch_size": (1, None, True, False),
    "train.lr": ((0,), None, False, False),
    "train.validation": (0, (1,), False, False),
    "train.dense": (1, None, True, False),
    "train.dropout": (0, (1,), False, False),
    "evolution.limit": (1, None, True, True),
    "evolution.patches": (1, None, True, False),
    "invariance.steps": (1, None, True, False),
    "correspondence.label": (0, None, True, False),
    "correspondence.random": (0, None, True, False),
    "correspondence.fill": (0, 255, False, False),
    "report.units": (0, None, True, False),
    "report.per_image": (0, None, True, False),
    "dissect.quantile": ((0,), (1,), False, False),
    "dissect.min_iou": (0, 1, False, False),
    "dissect.downsample": (1, None, True, True),
}


def check_config(cfg, schema=None) -> None:
    """Raise PipelineError (one line) for the first key that is unknown or out of range."""
    from pipeline.config import Config

    _unknown_keys(cfg, schema or Config, "")
    for key, (low, high, whole, nullable) in RULES.items():
        if OmegaConf.select(cfg, key, default="absent") == "absent":
            continue
        value = OmegaConf.select(cfg, key)
        if isinstance(value, DictConfig):  # {layer, channels, k}: checked by the stage that reads it
            continue
        if value is None:
            if not nullable:
                raise PipelineError(f"{key}=null: give {_rule(low, high, whole)}")
            continue
        for item in (value if isinstance(value, ListConfig) else [value]):  # lists: ids or indices
            if not _within(item, low, high, whole):
                shown = list(value) if isinstance(value, ListConfig) else value
                raise PipelineError(f"{key}={shown}: use {_rule(low, high, whole)}"
                                    + (" (or a list of them)" if isinstance(value, ListConfig) else ""))
    if cfg.shard.index >= cfg.shard.count:
        raise PipelineError(f"shard.index={cfg.shard.index} is not in 0..{cfg.shard.count - 1}: "
                            f"use 0 <= shard.index < shard.count")
    panel_layers = OmegaConf.select(cfg, "panels.layers", default="cropped")
    if not (panel_layers in ("cropped", "all") or isinstance(panel_layers, ListConfig)):
        raise PipelineError(f"panels.layers={panel_layers}: use cropped, all or a list of scanned layers, "
                            f"e.g. panels.layers=[features_7_conv_0_2]")
    cards = OmegaConf.select(cfg, "report.cards", default="all")
    if card_mode(cards) is None:
        raise PipelineError(f"report.cards={cards}: use all (a card for every unit), chosen (only the book's "
                            f"units, report.units) or none (no cards: sweeps)")
    if OmegaConf.select(cfg, "dataset.kind") == "segmentation":  # the concept list parses before anything runs
        from pipeline.segmentation import check_segmentation

        check_segmentation(cfg.dataset)
    if not list(cfg.stages):
        raise PipelineError("stages=[] runs nothing: list the stages to run, e.g. stages=[scan,crop,report]")


def renamed_key(key: str) -> None:
    """Refuse a key that was renamed (pipeline.config.RENAMED), naming the new one."""
    from pipeline.config import RENAMED

    if key in RENAMED:
        raise PipelineError(f"{key} is now {RENAMED[key]}: write {RENAMED[key]}=... instead")


def renamed_override(args) -> str | None:
    """The one-line error for the first command-line override that sets a renamed key
    (`key=v`, `+key=v`, `++key=v`, `~key`), or None: run.py checks it before Hydra, which
    would refuse the old name with a long message of its own."""
    for arg in args:
        if arg.startswith("-"):
            continue
        key = arg.lstrip("+~").split("=", 1)[0]
        try:
            renamed_key(key)
        except PipelineError as err:
            return str(err)
    return None


def card_mode(value) -> str | None:
    """report.cards as all | chosen | none (true and false, its older values, are all and chosen);
    None when it is none of them."""
    if isinstance(value, bool):
        return "all" if value else "chosen"
    return value if value in ("all", "chosen", "none") else None


def _within(value, low, high, whole: bool) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or (whole and not float(value).is_integer()):
        return False
    above = value > low[0] if isinstance(low, tuple) else value >= low
    below = high is None or (value < high[0] if isinstance(high, tuple) else value <= high)
    return above and below


def _rule(low, high, whole: bool) -> str:
    text = f"{'a whole number' if whole else 'a number'} "
    text += f"> {low[0]}" if isinstance(low, tuple) else f">= {low}"
    if high is not None:
        text += f" and < {high[0]}" if isinstance(high, tuple) else f" and <= {high}"
    return text


def _unknown_keys(node, schema, prefix: str) -> None:
    """Keys a `+key=value` override added that no config section knows."""
    if not isinstance(node, DictConfig) or not dataclasses.is_dataclass(schema):
        return
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key == "hydra" or (prefix == "" and key.startswith("_")):
            continue
        if key not in fields:
            renamed_key(f"{prefix}{key}")
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise PipelineError(f"{prefix}{key} is not a config key{hint}: run python run.py --cfg job to see them")
        factory = fields[key].default_factory
        if factory is not dataclasses.MISSING and dataclasses.is_dataclass(default := factory()):
            _unknown_keys(node[key], type(default), f"{prefix}{key}.")
