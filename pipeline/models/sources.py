"""Model sources: the embedded MobileNetV2, keras.applications, a user's file.

Each returns a ModelBundle: the Keras model plus what the rest of the pipeline
must know about it (preprocessing, a name, the weights' hash).
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path

import keras

from pipeline.errors import PipelineError
from pipeline.models.mobilenet_v2 import sha256_file
from pipeline.preprocess import NORMALIZE_MODES, Preprocessing

logger = logging.getLogger(__name__)

# keras.applications module -> the normalisation its preprocess_input applies
_APP_NORMALIZE = {
    "vgg16": "caffe", "vgg19": "caffe", "resnet": "caffe", "resnet50": "caffe",
    "resnet_v2": "tf", "mobilenet": "tf", "mobilenet_v2": "tf", "inception_v3": "tf",
    "inception_resnet_v2": "tf", "xception": "tf", "nasnet": "tf",
    "densenet": "torch",
    # these models rescale inside the graph and want raw 0..255 pixels
    "efficientnet": "none", "efficientnet_v2": "none", "convnext": "none",
    "regnet": "none", "mobilenet_v3": "none",
}


@dataclass
class ModelBundle:
    model: keras.Model
    preprocessing: Preprocessing
    name: str
    weights_sha256: str = ""
    imagenet_classes: bool = False  # outputs are the 1000 ImageNet classes


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
    spec = Preprocessing(input_size=224, channels=3, resize="shorter", resize_size=256,
                         normalize="torch")
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
    weights = cfg.weights
    sha = ""
    if weights not in (None, "imagenet"):
        path = Path(weights).expanduser()
        if not path.exists():
            raise PipelineError(f"model.weights={weights} does not exist: pass imagenet, null or a weights file")
        sha = sha256_file(path)
        weights = str(path)
    kwargs = {}
    if cfg.input_size:
        kwargs = dict(include_top=False, input_shape=(cfg.input_size, cfg.input_size, 3))
    try:
        model = constructors[name](weights=weights, **kwargs)
    except Exception as err:  # download refused offline, wrong file, ...
        raise PipelineError(f"could not build {name} with weights={cfg.weights}: "
                            f"{str(err).splitlines()[0]} (offline? pass model.weights=<file> or null)") from err
    module = constructors[name].__module__.rsplit(".", 1)[-1]
    normalize = cfg.preprocess or _APP_NORMALIZE.get(module, "tf")
    size = _input_side(model, cfg.input_size)
    spec = Preprocessing(input_size=size, channels=3, resize=cfg.resize or "shorter",
                         resize_size=cfg.resize_size, normalize=normalize)
    return ModelBundle(model, spec, f"keras.applications.{name}", sha,
                       imagenet_classes=kwargs == {} and model.output_shape[-1] == 1000)


def _model_file(cfg) -> ModelBundle:
    if cfg.path in (None, "", "???"):
        raise PipelineError("model.path is not set: add model.path=<file.keras or file.h5>")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise PipelineError(f"model.path={cfg.path} does not exist: pass an existing .keras or .h5 file")
    if cfg.preprocess not in NORMALIZE_MODES:
        raise PipelineError(f"model.preprocess={cfg.preprocess} is not one of {', '.join(NORMALIZE_MODES)}")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as err:
        raise PipelineError(f"could not load model file {path}: {str(err).splitlines()[0]}") from err
    size = _input_side(model, cfg.input_size)
    if model.input_shape[1] is None:
        model = _with_input_size(model, size)
    channels = int(model.input_shape[-1] or 3)
    spec = Preprocessing(input_size=size, channels=channels, resize=cfg.resize or "shorter",
                         resize_size=cfg.resize_size, normalize=cfg.preprocess)
    return ModelBundle(model, spec, path.name, sha256_file(path))


def _snapshot(cfg) -> ModelBundle:
    """A snapshot saved by the train stage: model.run_dir (null: this Hydra run), model.epoch (null: last)."""
    from pipeline.train import load_snapshot

    run_dir = cfg.get("run_dir")
    if run_dir in (None, "", "???"):
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise PipelineError("model.run_dir is not set: add model.run_dir=<run directory of a train run>")
        run_dir = HydraConfig.get().runtime.output_dir
    return load_snapshot(run_dir, cfg.get("epoch"))


def _input_side(model, configured: int | None) -> int:
    shape = model.input_shape
    if isinstance(shape, list):
        if len(shape) != 1:
            raise PipelineError(f"the model has {len(shape)} inputs: only single-image models are supported")
        shape = shape[0]
    h, w = shape[1], shape[2]
    if h is None or w is None:
        if not configured:
            raise PipelineError("the model does not fix its input size: add model.input_size=<pixels>")
        return int(configured)
    if h != w:
        raise PipelineError(f"the model wants non-square {h}x{w} inputs: only square inputs are supported")
    if configured and configured != h:
        raise PipelineError(f"model.input_size={configured} but the model fixes {h}: drop model.input_size")
    return int(h)


def _with_input_size(model: keras.Model, size: int) -> keras.Model:
    """The same model with a fixed spatial input size: geometry needs one."""
    channels = model.input_shape[-1]
    try:
        fixed = keras.models.clone_model(model, input_tensors=keras.Input((size, size, channels)))
    except Exception as err:
        raise PipelineError(f"could not fix the input size of the model to {size}: "
                            f"{str(err).splitlines()[0]}; save the model with a fixed input shape") from err
    fixed.set_weights(model.get_weights())
    return fixed
