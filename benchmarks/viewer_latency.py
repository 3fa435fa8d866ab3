"""Latency of the live viewer's requests against a bare forward pass of the same model.

Over HTTP, on a real server (the viewer as used in a browser, minus drawing): upload a
photo (decode, preprocess, forward pass, top-5), then for every scanned layer its tiles,
a unit's live map with deconv, and the unit's stored pictures. Prints the median time
of each request over repeats, the time a user waits after an upload (upload + tiles +
unit), and each figure as a ratio of one bare forward pass measured in the same run.
Target: selecting a unit or uploading an image answers in under a second on a CPU for
the embedded MobileNetV2.

    python benchmarks/viewer_latency.py [--run-dir DIR] [--repeats 5]

Without --run-dir it first makes one: the default layers of the embedded model on the
bundled photos, stages scan and crop (about a minute).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.viewer.server import Viewer, make_handler  # noqa: E402


def make_run(folder: Path) -> Path:
    run_dir = folder / "run"
    subprocess.run([sys.executable, str(ROOT / "run.py"), "stages=[scan,crop]", f"hydra.run.dir={run_dir}"],
                   check=True, cwd=ROOT)
    return run_dir


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory()
    run_dir = args.run_dir or make_run(Path(tmp.name))

    from http.server import ThreadingHTTPServer

    viewer = Viewer(run_dir)
    assert viewer.model is not None, viewer.banner
    viewer.model.warm()  # what the server does in the background at start
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(viewer))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    def request(method: str, path: str, body: bytes | None = None) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        conn.request(method, path, body=body)
        r = conn.getresponse()
        out = json.loads(r.read())
        conn.close()
        assert r.status == 200, out
        return out

    rng = np.random.default_rng(0)
    photos = []
    for _ in range(args.repeats + 1):  # a new photo each time: nothing cached
        buf = io.BytesIO()
        Image.fromarray((rng.random((480, 640, 3)) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        photos.append(buf.getvalue())

    model, spec = viewer.model, viewer.inputs.spec
    x = np.zeros((1,) + spec.size + (spec.channels,), np.float32)
    model.model(x, training=False)
    bare = timed(lambda: model.model(x + rng.random(x.shape, np.float32), training=False), args.repeats)

    uploads = iter(photos)
    refs = []
    upload = timed(lambda: refs.append(request("POST", "/api/upload", next(uploads))["image"]), args.repeats)
    ref = refs[-1]
    rows = []
    for e in viewer.view.layers:
        tiles = timed(lambda: request("GET", f"/api/activations?image={ref}&layer={e.key}"), args.repeats)
        units = iter(range(10**6))
        unit = timed(lambda: request("GET", f"/api/unit?image={ref}&layer={e.key}&unit={next(units) % e.shape[2]}"
                                            f"&method=deconv"), args.repeats)
        stored = timed(lambda: request("GET", f"/api/precomputed?layer={e.key}&unit={next(units) % e.shape[2]}"),
                       args.repeats)
        rows.append((e.name, e.shape, tiles, unit, stored))
    server.shutdown()

    print(f"run: {run_dir}  model: {viewer.view.model_name}  repeats: {args.repeats}")
    print(f"bare forward pass (1 image):          {bare * 1e3:8.1f} ms")
    print(f"upload (decode, forward, top-5):      {upload * 1e3:8.1f} ms   {upload / bare:6.1f}x bare")
    print(f"{'layer':<28} {'shape':>14} {'tiles ms':>9} {'unit+deconv ms':>15} {'stored ms':>10} "
          f"{'unit click ms':>14} {'after upload ms':>16}")
    for name, shape, tiles, unit, stored in rows:
        click = max(unit, stored)  # the page sends both at once
        print(f"{name:<28} {'x'.join(map(str, shape)):>14} {tiles * 1e3:9.1f} {unit * 1e3:15.1f} {stored * 1e3:10.1f} "
              f"{click * 1e3:14.1f} {(upload + tiles + click) * 1e3:16.1f}")
    worst_click = max(max(u, s) for _, _, _, u, s in rows)
    worst_upload = max(upload + t + max(u, s) for _, _, t, u, s in rows)
    print(f"worst unit click: {worst_click * 1e3:.0f} ms ({worst_click / bare:.1f}x bare); "
          f"worst wait after an upload: {worst_upload * 1e3:.0f} ms ({worst_upload / bare:.1f}x bare); "
          f"target < 1000 ms: {'met' if max(worst_click, worst_upload) < 1.0 else 'NOT met'}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
