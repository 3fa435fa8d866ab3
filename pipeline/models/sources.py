"""Model sources: the embedded MobileNetV2, keras.applications, a user's file.

Each returns a ModelBundle: the Keras model plus what the rest of the pipeline
must know about it (preprocessing, a name, the weights' hash).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras

from pipeline.errors import PipelineError
from pipeline.models.archive import check_keras_archive
from pipeline.models.mobilenet_v2 import sha256_file
from pipeline.preprocess import NORMALIZE_MODES, Preprocessing

logger = logging.getLogger(__name__)

# keras.applications module -> the normalisation its preprocess_input applies
_APP_NORMALIZE = {
    "vgg16": "caffe", "vgg19": "caffe", "resnet": "caffe",
    "resnet_v2": "tf", "mobilenet": "tf", "mobilenet_v2": "tf", "inception_v3": "tf",
    "inception_resnet_v2": "tf", "xception": "tf", "nasnet": "tf",
    "densenet": "torch",
    # these models rescale inside the graph and want raw 0..255 pixels
    "efficientnet": "none", "efficientnet_v2": "none", "convnext": "none",
    "mobilenet_v3": "none",
}


@dataclass
class ModelBundle:
    model: keras.Model
    preprocessing: Preprocessing
    name: str
    weights_sha256: str = ""
    imagenet_classes: bool = False  # outputs are the 1000 ImageNet classes
    random_weights: bool = False  # an untrained network (keras_app model.weights=null)
    # layer names TensorFlow refused, old -> the name the model now has (_graph_safe_names):
    # every user-given layer name resolves through it (pipeline.graph.resolve_layer_names)
    renamed: dict[str, str] = field(default_factory=dict)

    def layer(self, name: str | None) -> str | None:
        """The qualified name of the layer the user calls `name`; None stays None (the
        engine's default layer)."""
        from pipeline.graph import resolve_layer_names

        return None if name is None else resolve_layer_names(self.model, [name], self.renamed)[0]


def load_model(cfg, cache_dir: str | None = None) -> ModelBundle:
    kind = cfg.kind
    if kind == "mobilenet_v2":
        return _mobilenet_v2(cfg, cache_dir)
    if kind == "keras_app":
        return _keras_app(cfg)
    if kind == "file":
        return _model_file(cfg)
    if kind == "snapshot":
        return _snapshot(cfg)
    raise PipelineError(f"unknown model kind {kind!r}: use model=mobilenet_v2|keras_app|file|snapshot")


def _mobilenet_v2(cfg, cache_dir) -> ModelBundle:
    from pipeline.models import mobilenet_v2

    model = mobilenet_v2.load_mobilenet_v2(cache_dir, cfg.weights_path)
    spec = Preprocessing(height=224, width=224, channels=3, resize="shorter", resize_size=256, normalize="torch")
    return ModelBundle(model, spec, "mobilenet_v2 (torchvision weights)",
                       mobilenet_v2.WEIGHTS_SHA256, imagenet_classes=True)


def _keras_app(cfg) -> ModelBundle:
    name = cfg.name
    constructors = {n: getattr(keras.applications, n) for n in dir(keras.applications)
                    if n[0].isupper() and callable(getattr(keras.applications, n))}
    if name not in constructors:
        close = difflib.get_close_matches(str(name), constructors, n=3)
        raise PipelineError(f"model.name={name} is not a keras.applications model; "
                            f"did you mean {', '.join(close) or 'one of ' + ', '.join(sorted(constructors)[:8])}?")
    module = constructors[name].__module__.rsplit(".", 1)[-1]
    family = _APP_NORMALIZE.get(module)
    if family is None and cfg.preprocess is None:
        raise PipelineError(f"keras.applications.{name} ({module}) has no known preprocessing: set "
                            f"model.preprocess to one of {', '.join(NORMALIZE_MODES)}")
    _check_preprocess(cfg.preprocess)
    weights = cfg.weights
    sha = ""
    if weights not in (None, "imagenet"):
        path = Path(weights).expanduser()
        if not path.exists():
            raise PipelineError(f"model.weights={weights} does not exist: pass imagenet, null or a weights file")
        sha = sha256_file(path)
        weights = str(path)
    wanted = configured_size(cfg.input_size)
    model = _build_app(constructors[name], name, weights, wanted, cfg.weights)
    size = _input_size(model, wanted)
    normalize = _normalisation(model, cfg.preprocess, family)
    spec = Preprocessing(height=size[0], width=size[1], channels=3, resize=cfg.resize or "shorter",
                         resize_size=cfg.resize_size, normalize=normalize)
    random = cfg.weights is None
    label = f"keras.applications.{name}" + (" (random weights)" if random else "")
    return ModelBundle(model, spec, label, sha, random_weights=random,
                       imagenet_classes=not random and model.output_shape[-1] == 1000 and len(model.output_shape) == 2)


RANDOM_WEIGHTS_SEED = 0  # model.weights=null: the same network in every stage, resume and viewer


def _build_app(constructor, name: str, weights, wanted, weights_setting):
    """The application, at `wanted` (h, w) when given: with its classifier where the
    architecture allows it, else without (and the stages that need class scores say so).

    Random weights are seeded: Keras draws each initializer's seed from Python's
    `random`, so unseeded every stage would build a different network and the
    panels of a run would not belong to its scan. The caller's random state is kept.
    """
    state = random.getstate()
    random.seed(RANDOM_WEIGHTS_SEED)
    try:
        return _build_app_unseeded(constructor, name, weights, wanted, weights_setting)
    finally:
        random.setstate(state)


def _build_app_unseeded(constructor, name: str, weights, wanted, weights_setting):
    try:
        if wanted is None:
            return constructor(weights=weights)
        try:
            return constructor(weights=weights, input_shape=(*wanted, 3))
        except ValueError as err:  # e.g. ImageNet weights with a classifier fix the input size
            logger.warning("keras.applications.%s keeps no classifier at %dx%d (%s): built with "
                           "include_top=False, so cam, occlusion and class patterns are skipped",
                           name, *wanted, str(err).splitlines()[0][:160])
            return constructor(weights=weights, include_top=False, input_shape=(*wanted, 3))
    except PipelineError:
        raise
    except Exception as err:  # download refused offline, wrong file, ...
        raise PipelineError(f"could not build {name} with weights={weights_setting}: "
                            f"{str(err).splitlines()[0]} (offline? pass model.weights=<file> or null)") from err


def _model_file(cfg) -> ModelBundle:
    if cfg.path in (None, "", "???"):
        raise PipelineError("model.path is not set: add model.path=<file.keras or file.h5>")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise PipelineError(f"model.path={cfg.path} does not exist: pass an existing .keras or .h5 file")
    _check_preprocess(cfg.preprocess)
    if path.suffix == ".keras":
        check_keras_archive(path)
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as err:
        raise PipelineError(f"could not load model file {path}: {str(err).splitlines()[0]}") from err
    renamed = _graph_safe_names(model)
    wanted = configured_size(cfg.input_size)
    size = _input_size(model, wanted)
    if None in model.input_shape[1:3]:
        model = _with_input_size(model, size)
    channels = int(model.input_shape[-1] or 3)
    spec = Preprocessing(height=size[0], width=size[1], channels=channels, resize=cfg.resize or "shorter",
                         resize_size=cfg.resize_size, normalize=_normalisation(model, cfg.preprocess, "unit"))
    return ModelBundle(model, spec, path.name, sha256_file(path), renamed=renamed)


def _snapshot(cfg) -> ModelBundle:
    """A snapshot saved by the train stage: model.run_dir (null: this Hydra run), model.epoch (null: last)."""
    run_dir = cfg.get("run_dir")
    if run_dir in (None, "", "???"):
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise PipelineError("model.run_dir is not set: add model.run_dir=<run directory of a train run>")
        run_dir = HydraConfig.get().runtime.output_dir
    return load_snapshot(run_dir, cfg.get("epoch"))


_SCOPE_NAME = re.compile(r"^[A-Za-z0-9_.\\/>-]*$")  # what TensorFlow accepts as a graph scope


def _graph_safe_names(model) -> dict[str, str]:
    """Rename the layers whose names TensorFlow refuses in graph scopes ('a<b', 'x(1)'):
    the model could not run in a tf.function otherwise. Returns old -> new, which the
    bundle keeps so the old names still resolve; each rename is said once."""
    renamed = {}
    layers = list(model._flatten_layers(include_self=False, recursive=True))
    taken = {layer.name for layer in layers}
    for layer in layers:
        if _SCOPE_NAME.match(layer.name):
            continue
        new = re.sub(r"[^A-Za-z0-9_.-]", "_", layer.name) or "layer"
        while new in taken:
            new += "_"
        logger.warning("layer %r is called %r here: TensorFlow does not accept its characters in graph names",
                       layer.name, new)
        renamed[layer.name], layer.name = new, new
        taken.add(new)
    return renamed


def _check_preprocess(value) -> None:
    if value is not None and value not in NORMALIZE_MODES:
        raise PipelineError(f"model.preprocess={value} is unknown: use one of {', '.join(NORMALIZE_MODES)}, "
                            f"or leave it out")


def configured_size(value) -> tuple[int, int] | None:
    """model.input_size: null, N (N x N) or [H, W]."""
    if value is None:
        return None
    from omegaconf import ListConfig

    if isinstance(value, (list, tuple, ListConfig)) and len(value) == 2:
        h, w = value
    elif isinstance(value, int) and not isinstance(value, bool):
        h = w = value
    else:
        raise PipelineError(f"model.input_size={value}: give N (an N x N input) or [H, W]")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (h, w)):
        raise PipelineError(f"model.input_size={value}: sizes are positive whole numbers of pixels")
    return int(h), int(w)


def _input_size(model, wanted: tuple[int, int] | None) -> tuple[int, int]:
    """(height, width) of the image input, checked to be an image model in channels_last."""
    shape = model.input_shape
    if isinstance(shape, list):
        if len(shape) != 1:
            raise PipelineError(f"the model has {len(shape)} inputs: only single-image models are supported")
        shape = shape[0]
    if len(shape) != 4:
        raise PipelineError(f"model {model.name!r} takes inputs of shape {tuple(shape[1:])}: cnn-lens reads image "
                            f"models, whose input is (height, width, channels)")
    first = _channels_first_layer(model)
    if first is not None:
        raise PipelineError(f"model {model.name!r} is channels_first (layer {first!r}; input {tuple(shape[1:])} "
                            f"is (channels, height, width)): cnn-lens reads channels_last models; rebuild it "
                            f"with data_format='channels_last' and copy the weights")
    h, w, c = shape[1:]
    if c is not None and c not in (1, 3):
        raise PipelineError(f"model {model.name!r} wants {c}-channel inputs: image files give 1 (grey) or 3 (RGB) "
                            f"channels")
    if h is None or w is None:
        if wanted is None:
            raise PipelineError("the model does not fix its input size: add model.input_size=N or [H, W]")
        return wanted
    if wanted is not None and wanted != (h, w):
        raise PipelineError(f"model.input_size={list(wanted)} but the model fixes {h}x{w}: drop model.input_size")
    return int(h), int(w)


def _channels_first_layer(model) -> str | None:
    from pipeline.graph import flat_layers

    for node in flat_layers(model):
        if getattr(node.layer, "data_format", None) == "channels_first":
            return node.name
    return None


def normalising_layer(model) -> str | None:
    """The Rescaling or Normalization layer a model applies to its input before any
    layer with weights, described, or None: such a model wants raw 0..255 pixels."""
    from pipeline.graph import flat_layers

    for node in flat_layers(model):
        layer = node.layer
        if isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)):
            if isinstance(layer, keras.layers.Rescaling):
                return f"{node.name} (Rescaling scale={layer.scale}, offset={layer.offset})"
            return f"{node.name} (Normalization)"
        if node.kind != "input" and getattr(layer, "weights", None):
            return None
    return None


def _normalisation(model, configured: str | None, default: str) -> str:
    """model.preprocess, or the default: raw pixels ('none') for a model that normalises
    its input itself; a configured scaling on top of the model's own is said once."""
    own = normalising_layer(model)
    if configured is None:
        if own is not None and default != "none":
            logger.info("the model normalises its input itself (%s): feeding it raw 0..255 pixels", own)
            return "none"
        return default
    if own is not None and configured != "none":
        logger.warning("model.preprocess=%s scales the pixels and the model scales them again (%s): use "
                       "model.preprocess=none unless that is intended", configured, own)
    return configured


def _with_input_size(model: keras.Model, size: tuple[int, int]) -> keras.Model:
    """The same model with a fixed spatial input size: geometry needs one."""
    channels = model.input_shape[-1]
    try:
        fixed = keras.models.clone_model(model, input_tensors=keras.Input((*size, channels)))
    except Exception as err:
        raise PipelineError(f"could not fix the input size of the model to {size[0]}x{size[1]}: "
                            f"{str(err).splitlines()[0]}; save the model with a fixed input shape") from err
    fixed.set_weights(model.get_weights())
    return fixed


# ---------------------------------------------------------------- snapshots of the train stage

SNAPSHOT_DIR = "snapshots"
SPEC_FILE = "preprocessing.json"


def snapshot_path(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / SNAPSHOT_DIR / f"epoch_{int(epoch):03d}.keras"



def save_spec(run_dir: Path, spec: Preprocessing, class_names: list[str]) -> None:
    folder = Path(run_dir) / SNAPSHOT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SPEC_FILE).write_text(json.dumps(dict(preprocessing=asdict(spec), class_names=class_names),
                                               indent=1, sort_keys=True))



def list_snapshots(run_dir: Path) -> dict[int, Path]:
    """Epoch -> snapshot file of a train run directory, sorted by epoch."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    found = {}
    for p in folder.glob("epoch_*.keras") if folder.is_dir() else ():
        try:
            found[int(p.stem.split("_", 1)[1])] = p
        except ValueError:
            continue
    return dict(sorted(found.items()))



def snapshot_run_dir(cfg, run_dir: Path) -> Path:
    """Where the snapshots of a run are: model.run_dir with model=snapshot, else this run."""
    model = cfg.model
    if model.kind == "snapshot" and model.get("run_dir") not in (None, "", "???"):
        return Path(str(model.run_dir)).expanduser()
    return Path(run_dir)



def load_snapshot(run_dir, epoch: int | None = None):
    """The model saved after `epoch` (null: the last) in a train run directory, as a ModelBundle."""
    import keras

    run_dir = Path(str(run_dir)).expanduser()
    found = list_snapshots(run_dir)
    if not found:
        raise PipelineError(f"no snapshots in {run_dir / SNAPSHOT_DIR}: run stages=[train] there first, "
                            f"or point model.run_dir at the run directory of a train run")
    if epoch is None:
        epoch = max(found)
    if int(epoch) not in found:
        raise PipelineError(f"no snapshot of epoch {epoch} in {run_dir / SNAPSHOT_DIR}: "
                            f"set model.epoch to one of {', '.join(map(str, found))}")
    path = found[int(epoch)]
    check_keras_archive(path)
    model = keras.models.load_model(path, compile=False, safe_mode=True)
    spec_file = run_dir / SNAPSHOT_DIR / SPEC_FILE
    if spec_file.exists():
        spec = Preprocessing(**json.loads(spec_file.read_text())["preprocessing"])
    else:
        spec = Preprocessing(height=int(model.input_shape[1]), width=int(model.input_shape[2]),
                             channels=int(model.input_shape[-1]), normalize="unit")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return ModelBundle(model, spec, f"{model.name} epoch {int(epoch)} ({run_dir.name})", digest)



def snapshot_class_names(run_dir) -> list[str]:
    spec_file = Path(str(run_dir)).expanduser() / SNAPSHOT_DIR / SPEC_FILE
    if not spec_file.exists():
        return []
    return list(json.loads(spec_file.read_text()).get("class_names", []))


def own_snapshots(cfg) -> tuple[str, ...]:
    """Stages that use the snapshots depend on this run's train stage, unless
    model=snapshot model.run_dir=... names another run."""
    return () if cfg.model.kind == "snapshot" and cfg.model.get("run_dir") not in (None, "", "???") else ("train",)


def analysed_model(cfg, run_dir: Path, configured) -> tuple[ModelBundle, list[str], bool]:
    """(bundle, class names, from_snapshot) for the stages that analyse a trained network:
    this run's last snapshot when it trained one, else the configured model (`configured()`,
    the run's shared bundle: pipeline.stage_context)."""
    if cfg.model.kind != "snapshot" and list_snapshots(run_dir):
        return load_snapshot(run_dir), snapshot_class_names(run_dir), True
    bundle = configured()
    names = []
    if cfg.model.kind == "snapshot":
        names = snapshot_class_names(snapshot_run_dir(cfg, run_dir))
    elif bundle.imagenet_classes:
        from pipeline.models.imagenet import class_names

        names = list(class_names())
    return bundle, names, cfg.model.kind == "snapshot"
