"""Structured configs: the schema Hydra validates every run against.

Registered in Hydra's ConfigStore as `base_config`, `model/base_model` and
`dataset/base_dataset`; the YAML files in conf/ extend them, so an unknown key
or a wrong type is an error before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

STAGES = ("scan", "crop", "report")


@dataclass
class ModelConfig:
    # mobilenet_v2 | keras_app | file
    kind: str = "mobilenet_v2"
    # keras_app: the keras.applications constructor (VGG16, ResNet50, ...)
    name: Optional[str] = None
    # keras_app: 'imagenet', a local weights file, or null for random weights
    weights: Optional[str] = None
    # mobilenet_v2: a local copy of the torchvision .pth file
    weights_path: Optional[str] = None
    # file: a .keras or .h5 model file
    path: Optional[str] = None
    # file: none | unit | caffe | tf | torch (keras_app and mobilenet_v2 set their own)
    preprocess: Optional[str] = None
    # input side in pixels where the model does not fix it
    input_size: Optional[int] = None
    # 'shorter' (resize shorter side to resize_size, centre crop) or 'exact'
    resize: Optional[str] = None
    resize_size: Optional[int] = None


@dataclass
class DatasetConfig:
    # samples | folder | filelist | idx
    kind: str = "samples"
    # folder: root folder; filelist: the list file; idx: folder or images file
    path: Optional[str] = None
    # idx: which split to read ('train', 't10k' or a file name prefix)
    split: Optional[str] = None
    # take only the first N images (null: all)
    limit: Optional[int] = None


@dataclass
class CropConfig:
    # frames larger than this (pixels a side) are stored downsampled to fit it
    max_size: int = 64


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    # a preset (default | activations | conv | last | all) or a list of layer names
    layers: Any = "default"
    stages: list = field(default_factory=lambda: list(STAGES))
    topk: int = 9
    batch_size: int = 32
    crop: CropConfig = field(default_factory=CropConfig)
    # where converted models are cached (null: $CNN_LENS_CACHE or ~/.cache/cnn-lens)
    cache_dir: Optional[str] = None
    # recompute stages whose results are already in the run directory
    overwrite: bool = False


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="dataset", name="base_dataset", node=DatasetConfig)


register_configs()
