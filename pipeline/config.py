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
    # none | unit | caffe | tf | torch; null: the model family's own (keras_app), raw pixels
    # for a model that normalises its input itself, else unit (file)
    preprocess: Optional[str] = None
    # the input in pixels where the model does not fix it: N (N x N) or [H, W]
    input_size: Any = None
    # 'shorter' (scale to cover the input with the resize_size margin, centre crop) or 'exact'
    resize: Optional[str] = None
    # the shorter input side before the crop (e.g. 256 for 224); null: no margin
    resize_size: Optional[int] = None
    # multi-output models: the head (output name or index) that cam, occlusion, predictions
    # and class patterns explain; null: the first
    output: Any = None
    # snapshot: the run directory of a train run (null: this run) and the epoch (null: the last)
    run_dir: Optional[str] = None
    epoch: Optional[int] = None


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
    # files larger than this (MiB) are not read; images whose header gives more pixels than
    # this are not decoded (a 6000x4000 photo is 24M): recorded in images/error instead
    max_mb: float = 512.0
    max_pixels: int = 50_000_000
    # turn photos upright by their EXIF orientation (tag 0x0112, set by phones and cameras),
    # wherever pixels come from a file; false: pixels as stored
    exif: bool = True
    # segmentation: the folder of label PNGs (same relative path and stem as each image; each
    # pixel a concept index, 0 unlabelled) and the concept list ('index name [category]' lines)
    masks: Optional[str] = None
    concepts: Optional[str] = None
    # segmentation: masks (the above) or broden (dataset.path holds Broden's index.csv, label.csv)
    format: str = "masks"
    # segmentation, format masks: concepts of these categories label whole images (the paper's
    # scene and texture): present anywhere in a mask, the whole image is their mask
    image_level: list = field(default_factory=lambda: ["scene", "texture"])
    # segmentation, format masks: a CSV (a .tsv: tab-separated) of 'image path under
    # dataset.path, concept name[;name...]' rows: concepts that label whole images (scene, texture)
    image_labels: Optional[str] = None


@dataclass
class CropConfig:
    # frames larger than this (pixels a side) are stored downsampled to fit it
    max_size: int = 64


@dataclass
class GeometryConfig:
    # custom layer classes (by class name) whose every output position reads only the same
    # input position: the receptive-field mapper passes through them
    pointwise: list = field(default_factory=list)


@dataclass
class CheckpointConfig:
    # every long stage (scan, crop, panels, activations, cam, occlusion, filters, evolution)
    # commits its work at least this often; a killed run resumes from the last commit
    seconds: float = 300.0
    # ... and also after every N batches (null: by time only)
    batches: Optional[int] = None
    # results a long stage holds in memory at most before it commits them (MiB): crop and
    # panels cut channels in blocks of this size, per-image stages commit when it is reached
    block_mb: float = 256.0


@dataclass
class ScanConfig:
    # also keep the k lowest-activating images per channel (0: off)
    bottomk: int = 0
    # leave the N outermost rows and columns of every feature map out of the top-k and
    # bottom-k (their winners often answer the zero padding, not the image); 0 keeps all
    border: int = 0
    # labelled images: per class, the mean of each unit's per-image max and mean, and the
    # units' class selectivity (pipeline.selectivity)
    classes: bool = True
    # per-class exemplars: for these classes (indices or names), each unit's top
    # `exemplars_k` images among that class's images ([]: none)
    exemplars: list = field(default_factory=list)
    exemplars_k: int = 4
    # also sketch every activation of every unit (the dissect stage's histogram), so that
    # stage finds its thresholds without a pass of its own; null: with dataset=segmentation
    sketch: Optional[bool] = None


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
    # any of deconv | guided | gradient (pipeline.backprop); one panels/<method> dataset each
    methods: list = field(default_factory=lambda: ["deconv", "guided", "gradient"])
    # seeds (top-k entries) per backward pass on whole images; receptive-field crops take more
    batch_size: int = 32
    # cropped: the scanned layers whose units run on receptive-field crops (fast); all; or [name, ...]
    layers: Any = "cropped"


@dataclass
class ActivationsConfig:  # stage: activations
    # N for the first N images, a list of image ids, or {layer: NAME, channels: [..], k: 1}
    # for the k top images of those channels in the scan's results
    images: Any = 4
    # layers to store (null: the top-level `layers`)
    layers: Any = None
    # channels in the per-layer grid sheet (a square number: 64 gives 8x8)
    grid: int = 64
    # tiles per row in the every-channel sheet
    per_row: int = 16


@dataclass
class CamConfig:  # stage: cam
    # any of gradcam, gradcam++, scorecam, guided_gradcam
    # scorecam too, on request: one forward pass per active channel (minutes per image on a CPU)
    methods: list = field(default_factory=lambda: ["gradcam", "gradcam++", "guided_gradcam"])
    # target layer (null: the last rank-4 output with height and width > 1)
    layer: Optional[str] = None
    # predicted | label (unlabelled images: predicted) | classes (cam.classes for every image) | top (cam.top_n)
    target: str = "predicted"
    # class indices or names for target=classes
    classes: list = field(default_factory=list)
    top_n: int = 1
    # Score-CAM: masked images per forward pass (bounds its memory)
    scorecam_batch: int = 256
    # Score-CAM over N channels per image, those of highest variance (Faster Score-CAM;
    # null: every channel, the exact method)
    scorecam_channels: Optional[int] = None
    # deletion and insertion curves (RISE) of the Grad-CAM-family maps with this many steps
    # (2 x (steps + 1) forward passes per image and method); 0: off
    faithfulness_steps: int = 0
    # images drawn as overlays and given input-resolution maps (guided Grad-CAM): N (the
    # first N), a list of ids, {layer: NAME, channels: [..], k: 1} (top images of those
    # channels in the scan), 0 (none) or null (every image: large and slow)
    draw: Any = 16
    # heatmap opacity over the photo
    alpha: float = 0.4


@dataclass
class OcclusionConfig:  # stage: occlusion
    # N for the first N images, a list of image ids, or {layer: NAME, channels: [..], k: 1}
    images: Any = 4
    # side of the grey square and its step, in model-input pixels (null: a seventh of the
    # input's shorter side, 32 for 224; the step: the square, a 7x7 grid)
    size: Optional[int] = None
    stride: Optional[int] = None
    # grey level (0-255) of the square, before normalisation
    fill: int = 128
    # predicted | label (unlabelled images: predicted)
    target: str = "predicted"
    # layer whose strongest feature map is followed (null: the CAM default layer)
    layer: Optional[str] = None
    # square positions per forward pass
    batch_size: int = 64


@dataclass
class FiltersConfig:  # stage: filters
    # channels per layer for the patterns: null (all), N (the first N) or a list of indices
    channels: Any = None
    # fourier (Fourier-space, colour-decorrelated image, random transforms, Adam) | plain
    # (the tutorials' normalised gradient ascent on raw pixels)
    method: str = "fourier"
    # channel (maximise the mean activation) | neg (minimise it) | class (a class logit)
    objective: str = "channel"
    # objective=class: class indices or ImageNet class names
    classes: list = field(default_factory=list)
    steps: int = 256
    # side of the optimised image in px (null: the model's input size); patterns are
    # stored at the input size
    size: Optional[int] = 128
    # learning rate (null: 0.05 for fourier, 0.02 for plain)
    lr: Optional[float] = None
    # seed of every random number (initial images, transformations)
    seed: int = 0
    # patterns per channel, each from its own random start (the best one is `patterns`)
    restarts: int = 1
    # images optimised at once
    batch_size: int = 16
    # random padding, jitter, scale and rotation at every step (fourier only)
    transforms: bool = True
    # to the input size: auto (tile for fourier channel/neg, else resize) | tile | resize
    upscale: str = "auto"
    # kernels stored: selected (first convolution + those feeding the layers) | all | none
    weights: str = "selected"
    # objective=channel: where another channel's pattern excites a channel more than its
    # own, climb again from that pattern (plain ascent at the input size) and keep the better
    rivals: bool = True
    # write toolbox/regularized_opt/<layer>/ (Deep Visualization Toolbox layout)
    toolbox: bool = True


@dataclass
class TrainConfig:  # stage: train
    epochs: int = 10
    # epochs after which the model is saved (0: the untrained start); the last epoch always is
    snapshots: list = field(default_factory=lambda: [1, 2, 5, 10])
    batch_size: int = 64
    # adam | rmsprop | sgd (momentum 0.9)
    optimizer: str = "adam"
    lr: float = 1e-3
    # fraction of the labelled images held out for validation
    validation: float = 0.1
    seed: int = 0
    # model input in pixels, N or [H, W] (null: the IDX images' own size, 64 for image files)
    input_size: Any = None
    # colour channels of the model input: 1 (grey) or 3 (null: 1 for single-channel IDX data, 3 otherwise)
    input_channels: Optional[int] = None
    # filters of the conv/max-pool blocks, the dense layer's width, the dropout rate before it
    filters: list = field(default_factory=lambda: [32, 64, 128, 128])
    dense: int = 512
    dropout: float = 0.5


@dataclass
class EvolutionConfig:  # stage: evolution
    # channels drawn per layer: N spread evenly over the layer, or a list of indices
    channels: Any = 8
    # layers to follow (null: the top-level `layers`)
    layers: Any = None
    # scan only the first N images of the dataset (null: all)
    limit: Optional[int] = None
    # top patches per sheet cell: 1, or 4/9 for a montage
    patches: int = 1


@dataclass
class InvarianceConfig:  # stage: invariance
    # image ids (a list), or N for one image of each of the first N classes
    images: Any = 4
    # layers whose feature vectors are compared (null: the top-level `layers` plus the classifier's input)
    layers: Any = None
    # vertical shift as a fraction of the input side, rotation in degrees, scale factor: [low, high]
    translation: list = field(default_factory=lambda: [-0.3, 0.3])
    rotation: list = field(default_factory=lambda: [-180.0, 180.0])
    scale: list = field(default_factory=lambda: [0.6, 1.8])
    # values per transformation, evenly spaced (the identity is always added)
    steps: int = 17
    # what fills the image where the transformation pulls in pixels from outside:
    # constant (black) | nearest | reflect | wrap
    fill_mode: str = "constant"
    # class whose probability is drawn: label | predicted (on the original image) |
    # auto (the label for a network trained by the train stage, else the prediction)
    target: str = "auto"


@dataclass
class CorrespondenceConfig:  # stage: correspondence (Zeiler & Fergus section 4.3)
    # images of one class: a list of ids, or N for the first N images of class `label`
    images: Any = 5
    label: int = 0
    # layers whose feature changes are compared (null: the top-level `layers` plus the classifier's input)
    layers: Any = None
    # parts occluded at the same place in every image: [y0, x0, y1, x1] boxes as fractions of
    # the side, and their names (default: part0, part1, ...)
    parts: list = field(default_factory=lambda: [[0.1, 0.0, 0.45, 0.35], [0.1, 0.65, 0.45, 1.0]])
    part_names: list = field(default_factory=lambda: ["left", "right"])
    # random occluder positions (one box per trial, the same in every image) to compare against
    random: int = 10
    # grey level (0-255) of the occluder, as occlusion.fill
    fill: float = 0.0


@dataclass
class AblationConfig:  # stage: ablation
    # layers whose units are zeroed one at a time (null: the last of `layers`)
    layers: Any = None
    # N: the N most class-selective units of the scan (the first N without one); or a list
    units: Any = 16
    # use only the first N labelled images, in id order (null: all)
    limit: Optional[int] = None
    # images per pass; a pass holds (units + 1) x batch_size rows
    batch_size: int = 8


@dataclass
class RandomizationConfig:  # stage: randomization
    # image ids (a list), N (the first N), or {layer, channels, k} from the scan's top-k
    images: Any = 4
    # cumulative re-initialisations from the top of the network to its first layer
    steps: int = 6
    seed: int = 0


@dataclass
class DissectConfig:  # stage: dissect (network dissection, Bau et al. 2017)
    # T_k: the level each unit exceeds at this share of all positions of all images
    quantile: float = 0.005
    # a unit is a detector of its best concept when that IoU is above this
    min_iou: float = 0.04
    # a run directory whose dissection thresholds to use instead of computing them (shards)
    thresholds: Optional[str] = None
    # masks and upsampled maps at the input size / downsample; null: 2 where it divides both
    # sides of the input (NetDissect-Lite scores 224 inputs at 112x112), else 1
    downsample: Optional[int] = None


@dataclass
class ReportConfig:  # stage: report
    # all: a card (JPEG) and a thumbnail for every unit, and one HTML page per layer;
    # chosen: cards only for the units the book shows (report.units); none: no cards (sweeps)
    cards: Any = "all"
    # units with a card in the PDF book: N (the first N of each layer) or a list of unit indices
    units: Any = 8
    # write report.pdf (layer sheets, the chosen units' cards, per-image sheets)
    pdf: bool = True
    # images with a per-image sheet: N (the first N with per-image maps) or a list of image ids
    per_image: Any = 8


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    # a preset (default | activations | conv | last | all) or a list of layer names
    layers: Any = "default"
    stages: list = field(default_factory=lambda: ["scan", "crop", "panels", "activations", "cam", "occlusion",
                                                  "report", "export"])
    topk: int = 9
    batch_size: int = 32
    crop: CropConfig = field(default_factory=CropConfig)
    scan: ScanConfig = field(default_factory=ScanConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    # GPU ids of this machine to spread shard jobs over: shard i sees only gpus[i % len(gpus)]
    # (CUDA_VISIBLE_DEVICES, set before TensorFlow starts); [] leaves the devices as they are
    gpus: list = field(default_factory=list)
    merge: MergeConfig = field(default_factory=MergeConfig)
    panels: PanelsConfig = field(default_factory=PanelsConfig)
    activations: ActivationsConfig = field(default_factory=ActivationsConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    occlusion: OcclusionConfig = field(default_factory=OcclusionConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evolution: EvolutionConfig = field(default_factory=EvolutionConfig)
    invariance: InvarianceConfig = field(default_factory=InvarianceConfig)
    correspondence: CorrespondenceConfig = field(default_factory=CorrespondenceConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    randomization: RandomizationConfig = field(default_factory=RandomizationConfig)
    dissect: DissectConfig = field(default_factory=DissectConfig)
    # where converted models are cached (null: $CNN_LENS_CACHE or ~/.cache/cnn-lens)
    cache_dir: Optional[str] = None
    # recompute stages whose results are already in the run directory
    overwrite: bool = False
    report: ReportConfig = field(default_factory=ReportConfig)


# config keys renamed so that one name means one thing across sections: an old name is
# refused (pipeline.validate.renamed_key) with one line that names the new one
RENAMED = {
    "filters.batch": "filters.batch_size",  # batch_size everywhere else
    "filters.seeds": "filters.restarts",  # beside filters.seed, the random seed
    "train.channels": "train.input_channels",  # filters.channels selects units
    "invariance.fill": "invariance.fill_mode",  # occlusion.fill is a grey level
    "invariance.correspondence_images": "correspondence.images",  # the correspondence stage has its section
    "invariance.correspondence_class": "correspondence.label",
    "invariance.correspondence_parts": "correspondence.parts",
    "invariance.correspondence_names": "correspondence.part_names",
    "invariance.correspondence_random": "correspondence.random",
    "invariance.correspondence_fill": "correspondence.fill",
    # `images` chooses which images a stage looks at; a cap on how many it reads is a limit
    "evolution.images": "evolution.limit",  # as dataset.limit
    "ablation.images": "ablation.limit",
}


def is_sequence(value) -> bool:
    """A list given in the config (a ListConfig once composed) or in code."""
    from omegaconf import ListConfig

    return isinstance(value, (list, tuple, ListConfig))


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="model", name="base_model", node=ModelConfig)
    cs.store(group="dataset", name="base_dataset", node=DatasetConfig)


register_configs()
