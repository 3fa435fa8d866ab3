"""Structured configs: the schema Hydra validates every run against.

Registered in Hydra's ConfigStore as `base_config`, `model/base_model` and
`dataset/base_dataset`; the YAML files in conf/ extend them, so an unknown key
or a wrong type is an error before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

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
class ScanConfig:
    # save the scan state every N batches (a killed run resumes from there)
    checkpoint_every: int = 50
    # also keep the k lowest-activating images per channel (0: off)
    bottomk: int = 0


@dataclass
class ShardConfig:
    # scan the index-th of count deterministic slices of the dataset
    count: int = 1
    index: int = 0


@dataclass
class MergeConfig:
    # run directories of shard scans to combine into this one
    inputs: list = field(default_factory=list)


# ---- stage sections below are each owned by one stage module; keep edits inside a block


@dataclass
class PanelsConfig:  # stage: panels (deconv / guided backprop / gradient of top-k patches)
    methods: list = field(default_factory=lambda: ["deconv", "guided", "gradient"])
    batch_size: int = 32


@dataclass
class ActivationsConfig:  # stage: activations
    # image ids (a list), or N for the first N images
    images: Any = 4
    # layers to store (null: the scanned layers)
    layers: Any = None


@dataclass
class CamConfig:  # stage: cam
    methods: list = field(default_factory=lambda: ["gradcam", "gradcam++", "scorecam", "guided_gradcam"])
    # target layer (null: the last rank-4 output with height and width > 1)
    layer: Optional[str] = None
    # predicted | label | classes | top
    target: str = "predicted"
    classes: list = field(default_factory=list)
    top_n: int = 1


@dataclass
class OcclusionConfig:  # stage: occlusion
    images: Any = 4
    size: int = 32
    stride: int = 16


@dataclass
class FiltersConfig:  # stage: filters
    # channels per layer for the patterns (null: all)
    channels: Any = None
    steps: int = 256


@dataclass
class TrainConfig:  # stage: train
    epochs: int = 10
    snapshots: list = field(default_factory=lambda: [1, 2, 5, 10])


@dataclass
class EvolutionConfig:  # stage: evolution
    channels: Any = 8


@dataclass
class InvarianceConfig:  # stage: invariance
    images: Any = 4


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    # a preset (default | activations | conv | last | all) or a list of layer names
    layers: Any = "default"
    stages: list = field(default_factory=lambda: ["scan", "crop", "report"])
    topk: int = 9
    batch_size: int = 32
    crop: CropConfig = field(default_factory=CropConfig)
    scan: ScanConfig = field(default_factory=ScanConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    panels: PanelsConfig = field(default_factory=PanelsConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    occlusion: OcclusionConfig = field(default_factory=OcclusionConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)
    invariance: InvarianceConfig = field(default_factory=InvarianceConfig)
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
