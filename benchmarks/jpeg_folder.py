"""Folder scans of real JPEG files against a plain tf.data loop over the same files.

Two folders are written: ImageNet-like photos (500x375 and 375x500, cut from the
bundled sample photos) and 12-megapixel "phone photos" (4000x3000, every third one
stored turned with EXIF orientation 6, as phones write them). Each folder is scanned
three ways through the same tiny 224x224 model (resize 256, centre crop):

- plain : a tf.data loop that decodes every file in full and resizes it to 224x224;
- scan  : the project's stream (`BatchStream`: upright, DCT-scaled, bounded resize) and
          the scan's top-k tables (`Scanner.update`);
- scan, full decode : the same scan with DCT scaling and EXIF turned off, the decoding
          the stream did before them.

Prints images/s (median of interleaved rounds), the CPU time per image of the whole
process (steadier than images/s on a shared machine) and the ratios. Targets: phone photos
scanned >= 2x as fast as the plain loop; ImageNet-like photos no slower than the full
decode (within 5 %).

    python benchmarks/jpeg_folder.py [--imagenet 160] [--phone 40] [--noise 3] [--batch 16] [--rounds 3]

Run it with an older checkout on PYTHONPATH to time that checkout's stream the same way
(its "scan" then decodes as it did; the toggles of the third side are ignored there).
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.datasets import BatchStream, ImageTable, list_images  # noqa: E402
from pipeline.graph import feature_model  # noqa: E402
from pipeline.preprocess import Preprocessing, normalize  # noqa: E402
from pipeline.scan import Scanner  # noqa: E402

SPEC = Preprocessing(224, 224, resize_size=256, normalize="unit")


def sample_photos() -> list[np.ndarray]:
    samples = list_images(OmegaConf.create(dict(kind="samples", path=None, split=None, limit=None)))
    photos = []
    for path in samples.paths:
        with Image.open(path) as im:
            if min(im.size) >= 300:
                photos.append(np.asarray(im.convert("RGB")))
    return photos


def write_imagenet_like(folder: Path, count: int, photos) -> ImageTable:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        photo = Image.fromarray(photos[i % len(photos)])
        size = (500, 375) if i % 4 else (375, 500)
        scale = max(size[0] / photo.width, size[1] / photo.height) * rng.uniform(1.0, 1.3)
        photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC)
        x, y = rng.integers(0, photo.width - size[0] + 1), rng.integers(0, photo.height - size[1] + 1)
        path = folder / f"{i:05d}.jpg"
        photo.crop((x, y, x + size[0], y + size[1])).save(path, quality=90)
        paths.append(str(path))
    return ImageTable(paths, np.full(count, -1, np.int64))


def write_phone_photos(folder: Path, count: int, photos, noise: float = 3.0) -> ImageTable:
    """4000x3000 photos: a sample photo enlarged, with sensor-like noise so the files
    have a phone photo's detail (2-4 MB each); every third one stored turned a quarter,
    EXIF orientation 6."""
    rng = np.random.default_rng(1)
    exif = Image.Exif()
    exif[0x0112] = 6
    paths = []
    for i in range(count):
        photo = Image.fromarray(photos[i % len(photos)]).resize((4000, 3000), Image.BICUBIC)
        noisy = np.asarray(photo, np.int16) + rng.normal(0, noise, (3000, 4000, 1)).astype(np.int16)
        photo = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        path = folder / f"{i:05d}.jpg"
        if i % 3 == 2:
            photo.transpose(Image.Transpose.ROTATE_90).save(path, quality=92, exif=exif.tobytes())
        else:
            photo.save(path, quality=92)
        paths.append(str(path))
    return ImageTable(paths, np.full(count, -1, np.int64))


def tiny_model():
    inp = keras.Input((224, 224, 3))
    x = keras.layers.Conv2D(8, 3, strides=4, padding="same", name="conv")(inp)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, keras.layers.Dense(10, name="logits")(x))


def plain_loop(table: ImageTable, batch: int, model) -> float:
    """Images/s of the plain loop: full decode, resize to 224x224, the model."""
    ds = tf.data.Dataset.from_tensor_slices(table.paths)
    ds = ds.map(lambda p: tf.cast(tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(p), channels=3), (224, 224)),
                                  tf.uint8), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    start = time.perf_counter()
    for pixels in ds.batch(batch).prefetch(2):
        model(normalize(pixels, "unit"), training=False).numpy()
    return len(table) / (time.perf_counter() - start)


def scan_pass(table: ImageTable, batch: int, scanner, first_id: int, full_decode: bool) -> float:
    """Images/s of the project's stream and scan; `full_decode` turns DCT scaling and
    EXIF off (attributes an older checkout does not read)."""
    table.dct_scale = table.exif = not full_decode
    start = time.perf_counter()
    for ids, pixels in BatchStream(table, SPEC, batch):
        scanner.update(pixels, ids + first_id)
    return len(table) / (time.perf_counter() - start)


def cpu_seconds() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def measure(name: str, table: ImageTable, args, model) -> None:
    features = feature_model(model, ["relu"])
    scanner = Scanner(features, ["relu"], SPEC, k=9)
    sides = {"plain": lambda r: plain_loop(table, args.batch, model),
             "scan": lambda r: scan_pass(table, args.batch, scanner, (2 * r + 1) * len(table), False),
             "scan, full decode": lambda r: scan_pass(table, args.batch, scanner, (2 * r + 2) * len(table), True)}
    for side in sides.values():  # warm-up: traces, file cache
        side(-1)
    rates, cpu = {key: [] for key in sides}, {key: [] for key in sides}
    for r in range(args.rounds):  # interleaved, so drift on a shared machine hits every side alike
        for key, side in sides.items():
            used = cpu_seconds()
            rates[key].append(side(r))
            cpu[key].append((cpu_seconds() - used) / len(table) * 1000)
    med = {key: float(np.median(v)) for key, v in rates.items()}
    print(f"{name}: {len(table)} files, batch {args.batch}, {args.rounds} rounds (median images/s)")
    for key, value in med.items():
        print(f"  {key:<18} {value:8.1f} images/s  ({', '.join(f'{v:.1f}' for v in rates[key])}), "
              f"{np.median(cpu[key]):6.1f} CPU ms/image")
    ratios = [s / p for s, p in zip(rates["scan"], rates["plain"])]
    before = [s / f for s, f in zip(rates["scan"], rates["scan, full decode"])]
    print(f"  scan / plain             {np.median(ratios):6.2f}x  (rounds {', '.join(f'{v:.2f}' for v in ratios)})")
    print(f"  scan / scan, full decode {np.median(before):6.2f}x  (rounds {', '.join(f'{v:.2f}' for v in before)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imagenet", type=int, default=160, help="ImageNet-like files (0: none)")
    parser.add_argument("--phone", type=int, default=40, help="12-megapixel files (0: none)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    # the entropy decoding that no DCT scale skips grows with the noise: 0 gives about 1 MB
    # files (an enlarged photo, smooth), 3 about 2-4 MB (a phone's sensor noise)
    parser.add_argument("--noise", type=float, default=3.0, help="sensor noise of the phone photos (grey levels)")
    args = parser.parse_args()
    model = tiny_model()
    photos = sample_photos()
    with tempfile.TemporaryDirectory() as tmp:
        for name, count, write in (("ImageNet-like 500x375", args.imagenet, write_imagenet_like),
                                   ("phone photos 4000x3000", args.phone, write_phone_photos)):
            if count:
                folder = Path(tmp) / name.split()[0]
                folder.mkdir()
                extra = {"noise": args.noise} if write is write_phone_photos else {}
                measure(name, write(folder, count, photos, **extra), args, model)


if __name__ == "__main__":
    main()
