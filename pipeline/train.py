"""The small from-scratch convnet of the tutorials, its training loop and its snapshots.

The network: four blocks of a 3x3 'same' convolution with ReLU and a 2x2 max-pool
(32, 64, 128 and 128 filters), then flatten, dropout, a 512-unit ReLU dense layer,
a dense layer of class logits ('logits') and a softmax ('softmax'). 'same' padding
keeps every block valid for any input side of at least 16 pixels: the maps are
S, S/2, S/4 and S/8 (rounded down) pixels a side, and the flattened vector holds
(S/16)^2 x 128 values.

A training run saves the model after chosen epochs into
`<run dir>/snapshots/epoch_%03d.keras`, next to `preprocessing.json` (how pixels
are fed to it). `load_snapshot` reads one back as a ModelBundle; it is what
`model=snapshot` uses.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np

from pipeline.errors import PipelineError
from pipeline.preprocess import Preprocessing

logger = logging.getLogger(__name__)

MIN_SIDE = 16  # four 2x2 poolings
MAX_IN_MEMORY = 4 * 2**30  # bytes of model-input pixels a stage may hold at once
OPTIMIZERS = ("adam", "rmsprop", "sgd")


# ---------------------------------------------------------------- the model

def build_convnet(size: tuple[int, int], channels: int, classes: int,
                  filters=(32, 64, 128, 128), dense: int = 512, dropout: float = 0.5,
                  seed: int = 0):
    """The tutorials' small convnet, sized for (height, width) x `channels` inputs.

    Layer names: conv1..convN (ReLU inside), pool1..poolN, flatten, dropout, dense,
    logits, softmax. Weights are Glorot-uniform from `seed`, biases zero.
    """
    import keras

    filters = [int(f) for f in filters]
    if not filters:
        raise PipelineError("train.filters=[] builds no convolution: give at least one block, e.g. [32,64,128,128]")
    smallest = 2 ** len(filters)
    if min(size) < smallest:
        raise PipelineError(f"input {size[0]}x{size[1]} px is too small for {len(filters)} pooling blocks: "
                            f"set train.input_size to at least {smallest}")
    if classes < 2:
        raise PipelineError(f"the labels hold {classes} class: training needs at least two classes")
    inp = keras.Input((*size, channels), name="image")
    x = inp
    for i, n in enumerate(filters, 1):
        x = keras.layers.Conv2D(n, 3, padding="same", activation="relu", name=f"conv{i}",
                                kernel_initializer=keras.initializers.GlorotUniform(seed=seed + i))(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    x = keras.layers.Dense(dense, activation="relu", name="dense",
                           kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 101))(x)
    x = keras.layers.Dense(classes, name="logits",
                           kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 102))(x)
    out = keras.layers.Activation("softmax", name="softmax")(x)
    return keras.Model(inp, out, name="small_convnet")


def outputs_probabilities(model) -> bool:
    """True when the model's (last) output is already a softmax."""
    layer = model.layers[-1]
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", str(activation) if activation is not None else "")
    return type(layer).__name__ == "Softmax" or name == "softmax"


# ---------------------------------------------------------------- data

def training_spec(table, input_size, channels: int | None) -> Preprocessing:
    """How the training images are fed: the IDX images' own size and channels by default
    (train.input_size: N or [H, W])."""
    from pipeline.models.sources import configured_size

    arrays = table.arrays
    size = configured_size(input_size)
    if size is None:
        size = tuple(int(v) for v in arrays.shape[1:3]) if arrays is not None else (64, 64)
    if channels is None:
        channels = 1 if arrays is not None and (arrays.ndim == 3 or arrays.shape[-1] == 1) else 3
    if channels not in (1, 3):
        raise PipelineError(f"train.input_channels={channels}: use 1 (grey) or 3 (RGB)")
    return Preprocessing(height=size[0], width=size[1], channels=int(channels), resize="shorter",
                         normalize="unit")


def load_pixels(table, spec: Preprocessing, ids: np.ndarray, batch_size: int = 256,
                desc: str = "load") -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Model-input pixels of `ids` in memory: (ids read, uint8 (N, S, S, C), errors).

    IDX arrays already at the model's size are taken as they are; anything else goes
    through the pipeline's stream (resize, crop, grey/RGB, bad files recorded).
    """
    from tqdm import tqdm

    from pipeline.datasets import BatchStream, ready_arrays

    ids = np.asarray(ids, np.int64)
    need = len(ids) * spec.height * spec.width * spec.channels
    if need > MAX_IN_MEMORY:
        raise PipelineError(f"{len(ids)} images of {spec.height}x{spec.width}x{spec.channels} need "
                            f"{need / 2**30:.1f} GiB in memory: lower dataset.limit or train.input_size")
    ready = ready_arrays(table, spec)
    if ready is not None:
        return ids, np.ascontiguousarray(ready[ids], np.uint8), {}
    got_ids, got = [], []
    stream = BatchStream(table, spec, batch_size, ids=ids)
    with tqdm(total=len(ids), desc=desc, unit="img") as bar:
        for batch_ids, pixels in stream:
            got_ids.append(batch_ids)
            got.append(pixels.numpy())
            bar.update(len(batch_ids))
        bar.update(len(stream.errors))
    if not got:
        return np.zeros(0, np.int64), np.zeros((0, *spec.size, spec.channels), np.uint8), \
            stream.errors
    got_ids = np.concatenate(got_ids)
    order = np.argsort(got_ids, kind="stable")
    return got_ids[order], np.concatenate(got)[order], stream.errors


def split_ids(ids: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, validation) split of `ids`, each sorted."""
    if not 0.0 <= fraction < 1.0:
        raise PipelineError(f"train.validation={fraction}: give a fraction in [0, 1)")
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(np.asarray(ids, np.int64))
    n_val = int(round(fraction * len(shuffled)))
    if len(shuffled) - n_val < 1:
        raise PipelineError("no images left for training: lower train.validation or add images")
    return np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])


def snapshot_epochs(snapshots, epochs: int) -> list[int]:
    """The epochs to save, sorted; the last epoch is always among them."""
    if epochs < 1:
        raise PipelineError(f"train.epochs={epochs}: train for at least one epoch")
    chosen = sorted({int(e) for e in snapshots} | {int(epochs)})
    bad = [e for e in chosen if e < 0 or e > epochs]
    if bad:
        raise PipelineError(f"train.snapshots holds {bad}, outside 0..train.epochs={epochs}: "
                            f"drop them or raise train.epochs")
    return chosen


# ---------------------------------------------------------------- training

def _optimizer(name: str, lr: float):
    import keras

    if name == "adam":
        return keras.optimizers.Adam(lr)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(lr)
    if name == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9)
    raise PipelineError(f"train.optimizer={name}: use one of {', '.join(OPTIMIZERS)}")


def _batches(pixels: np.ndarray, labels: np.ndarray, batch_size: int, shuffle_seed: int | None):
    import tensorflow as tf

    from pipeline.preprocess import normalize

    ds = tf.data.Dataset.from_tensor_slices((pixels, labels))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(pixels), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda x, y: (normalize(x, "unit"), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(2)


def _progress_callback(epochs: int, steps: int, history: dict, snapshot_at: set, on_snapshot):
    """A Keras callback: a tqdm bar per epoch, per-epoch timing and metrics, snapshots."""
    import keras
    from tqdm import tqdm

    class Progress(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            if 0 in snapshot_at:
                on_snapshot(0)

        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()
            self.bar = tqdm(total=steps, desc=f"train epoch {epoch + 1}/{epochs}", unit="batch")

        def on_train_batch_end(self, batch, logs=None):
            self.bar.update(1)
            if logs and (batch % 25 == 0 or batch + 1 == steps):
                self.bar.set_postfix(loss=f"{float(logs['loss']):.4f}", acc=f"{float(logs['accuracy']):.4f}",
                                     refresh=False)

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            seconds = time.perf_counter() - self.started
            history["epoch"].append(epoch + 1)
            history["seconds"].append(seconds)
            for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
                history[key].append(float(logs.get(key, np.nan)))
            self.bar.set_postfix(loss=f"{history['loss'][-1]:.4f}", acc=f"{history['accuracy'][-1]:.4f}",
                                 val_acc=f"{history['val_accuracy'][-1]:.4f}")
            self.bar.close()
            logger.info("epoch %d/%d: loss %.4f, accuracy %.4f, validation loss %.4f, validation accuracy "
                        "%.4f (%.1f s)", epoch + 1, epochs, history["loss"][-1], history["accuracy"][-1],
                        history["val_loss"][-1], history["val_accuracy"][-1], seconds)
            if epoch + 1 in snapshot_at:
                on_snapshot(epoch + 1)

    return Progress()


def train(model, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
          epochs: int, batch_size: int, optimizer: str, lr: float, seed: int,
          snapshots: list[int], on_snapshot) -> dict[str, list[float]]:
    """Fit `model` (softmax output) on uint8 pixels; call on_snapshot(epoch) at the chosen epochs.

    Returns the per-epoch history: epoch, loss, accuracy, val_loss, val_accuracy, seconds.
    """
    import keras

    model.compile(optimizer=_optimizer(optimizer, lr), loss=keras.losses.SparseCategoricalCrossentropy(),
                  metrics=["accuracy"])
    history = {k: [] for k in ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds")}
    steps = math.ceil(len(train_x) / batch_size)
    train_ds = _batches(train_x, train_y, batch_size, shuffle_seed=seed)
    val_ds = _batches(val_x, val_y, max(batch_size, 256), None) if len(val_x) else None
    callback = _progress_callback(epochs, steps, history, set(snapshots), on_snapshot)
    model.fit(train_ds, epochs=epochs, validation_data=val_ds, callbacks=[callback], verbose=0,
              shuffle=False)  # the dataset shuffles itself, seeded
    return history


def predict_classes(model, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Argmax class of uint8 images through a 'unit'-normalised model, batched."""
    import tensorflow as tf

    from pipeline.preprocess import normalize

    if len(pixels) == 0:
        return np.zeros(0, np.int64)
    return np.concatenate([tf.argmax(model(normalize(pixels[i:i + batch_size], "unit"), training=False),
                                     axis=-1).numpy()
                           for i in range(0, len(pixels), batch_size)]).astype(np.int64)
