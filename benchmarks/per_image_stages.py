"""The default job's per-image stages against its scan, on a folder of ImageNet-sized JPEGs.

Writes N ImageNet-like photos (500x375 and 375x500, cut from the bundled sample photos,
as benchmarks/jpeg_folder.py does), then runs the scan and each per-image stage of the
default job (activations, cam, occlusion) with their default settings, each as its own
`run.py` process on one run directory. For every stage it prints the stage's own time
(the runner's "stage X done in Y s" line, so TensorFlow's start is left out), the CPU time
of the whole process (steadier than seconds on a shared machine), the bytes the stage
added to the run directory (its part in parts/ and its sheets), and the peak resident
memory of the process (os.wait4's rusage of that child). Then the bytes per image of every
HDF5 dataset the per-image stages stored (chunks and part files summed), largest first.

Targets (issue 26): the per-image stages together at most 1.5x the scan's time, at most
20 KB per image in results (parts/), each process under 3 GB peak.

    python benchmarks/per_image_stages.py [--images 2000] [--model default|tiny]
        [--checkout DIR] [--data DIR]

--checkout runs another checkout's run.py (e.g. an older commit unpacked with
`git archive`), for a before/after in the same session; --data keeps the generated
photos in DIR (reused when it already holds N of them).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("scan", "activations", "cam", "occlusion")


def write_photos(folder: Path, count: int) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from jpeg_folder import sample_photos, write_imagenet_like

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) == count:
        return
    for old in folder.glob("*.jpg"):
        old.unlink()
    write_imagenet_like(folder, count, sample_photos())


def tiny_classifier(path: Path) -> None:
    """A small 224 px convnet with 10 classes (random weights, seeded)."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((224, 224, 3))
    x = inp
    for i, (filters, stride) in enumerate(((16, 2), (32, 2), (64, 2), (64, 2))):
        x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", name=f"conv{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    keras.Model(inp, keras.layers.Dense(10, name="logits")(x)).save(path)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def dataset_bytes(parts: Path, stages) -> dict[str, int]:
    """Stored bytes of each HDF5 dataset of the stages' files under parts/ (their part and
    the chunk files a virtual dataset reads from), by dataset path."""
    import h5py

    sizes: dict[str, int] = {}
    for path in sorted(parts.rglob("*.h5")):
        if not path.name.startswith(tuple(stages)) and not path.parent.name.startswith(tuple(stages)):
            continue
        with h5py.File(path, "r") as f:
            def add(name, obj):
                if isinstance(obj, h5py.Dataset) and not obj.is_virtual:
                    sizes[name] = sizes.get(name, 0) + obj.id.get_storage_size()
            f.visititems(add)
    return sizes


def run_stage(checkout: Path, overrides: list[str], stage: str, run_dir: Path) -> tuple[float, float, float, float]:
    """(stage seconds, process seconds, process CPU seconds, peak RSS GiB) of one
    `run.py stages=[stage]` process."""
    env = dict(os.environ, PYTHONPATH=str(checkout), TF_CPP_MIN_LOG_LEVEL="2")
    started = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([sys.executable, str(checkout / "run.py"), *overrides, f"stages=[{stage}]",
                                 f"hydra.run.dir={run_dir}"], cwd=checkout, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        log.seek(0)
        text = log.read().decode(errors="replace")
    if proc.returncode:
        raise SystemExit(f"stage {stage} failed ({proc.returncode}):\n{text[-3000:]}")
    found = re.findall(rf"stage {stage} done in ([0-9.]+) s", text)
    seconds = float(found[-1]) if found else float("nan")
    return seconds, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20  # ru_maxrss: KiB on Linux


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--model", choices=("default", "tiny"), default="default")
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the checkout whose run.py runs (this one)")
    parser.add_argument("--data", type=Path, help="folder for the photos (default: a temporary one)")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args(argv)
    checkout = args.checkout.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = (args.data or tmp / "photos").resolve()
        write_photos(data, args.images)
        overrides = ["dataset=folder", f"dataset.path={data}", f"batch_size={args.batch}"]
        if args.model == "tiny":
            tiny_classifier(tmp / "tiny.keras")
            overrides += ["model=file", f"model.path={tmp / 'tiny.keras'}", "model.preprocess=torch"]
        run_dir = tmp / "run"
        print(f"{args.images} ImageNet-like JPEGs, model {args.model}, batch {args.batch}, checkout {checkout.name}, "
              f"{os.cpu_count()} CPU cores")
        print(f"  {'stage':<12} {'seconds':>8} {'x scan':>7} {'parts MB':>9} {'KB/image':>9} {'sheets MB':>10} "
              f"{'peak RSS GB':>12} {'process s':>10} {'CPU s':>7} {'x scan':>7}")
        rows = {}
        for stage in STAGES:
            parts_before, total_before = du(run_dir / "parts"), du(run_dir)
            seconds, wall, cpu, rss = run_stage(checkout, overrides, stage, run_dir)
            parts = du(run_dir / "parts") - parts_before
            sheets = du(run_dir) - total_before - parts
            rows[stage] = (seconds, parts, rss, cpu)
            ratio = seconds / rows["scan"][0]
            print(f"  {stage:<12} {seconds:8.1f} {ratio:7.2f} {parts / 1e6:9.2f} {parts / 1e3 / args.images:9.2f} "
                  f"{sheets / 1e6:10.2f} {rss:12.2f} {wall:10.1f} {cpu:7.1f} {cpu / rows['scan'][3]:7.2f}", flush=True)
        per_image = [s for s in STAGES if s != "scan"]
        seconds = sum(rows[s][0] for s in per_image)
        parts = sum(rows[s][1] for s in per_image)
        rss = max(rows[s][2] for s in per_image)
        cpu = sum(rows[s][3] for s in per_image)
        print(f"  per-image stages together: {seconds:.1f} s = {seconds / rows['scan'][0]:.2f}x the scan "
              f"(target <= 1.5x; CPU time of the processes, start-up included: {cpu / rows['scan'][3]:.2f}x), "
              f"{parts / 1e3 / args.images:.1f} KB/image in parts/ (target <= 20), peak RSS {rss:.2f} GB (target < 3)")
        print("  stored bytes per image by HDF5 dataset (largest first):")
        for name, size in sorted(dataset_bytes(run_dir / "parts", per_image).items(), key=lambda t: -t[1])[:16]:
            print(f"    {name:<44} {size / args.images:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
