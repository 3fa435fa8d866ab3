"""The live viewer over a real run directory: its computations against the model itself,
its server as a real process (safety: path traversal, upload bounds, read-only, clean stop),
and its page in a real headless Chromium (images, uploads, clicks, keys)."""

import hashlib
import http.client
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from PIL import Image

from test_pipeline import compose_cfg, tiny_model
from conftest import watched_page
from pipeline.backprop import backprop
from pipeline.preprocess import normalize
from pipeline.runner import run
from pipeline.viewer.server import Viewer, make_server

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def viewer_run(tmp_path_factory):
    """A tiny model's run with patches, deconv/guided panels, filter patterns and the report."""
    tmp = tmp_path_factory.mktemp("viewer")
    photos = tmp / "photos"
    rng = np.random.default_rng(3)
    for i in range(6):
        photos.joinpath("c" + str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((30 + 2 * i, 36, 3)) * 255).astype(np.uint8)).save(photos / f"c{i % 2}/p{i}.png")
    model = tiny_model(tmp / "tiny.keras")
    cfg = compose_cfg(["model=file", f"model.path={tmp / 'tiny.keras'}", "dataset=folder", f"dataset.path={photos}",
                       "layers=[relu1,relu2]", "stages=[scan,crop,panels,filters,report]",
                       "panels.methods=[deconv,guided]", "filters.steps=4",
                       "filters.weights=none", "filters.size=24"])
    run_dir = tmp / "run"
    run(cfg, run_dir)
    return model, run_dir, tmp


def files_state(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def png_bytes(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- computations, in process


def test_live_maps_predictions_and_backprop_are_the_models(viewer_run):
    model, run_dir, _ = viewer_run
    viewer = Viewer(run_dir)
    live = viewer.model
    assert live is not None and viewer.banner == ""
    pixels = viewer.inputs.pixels("2")
    assert pixels.shape == (24, 24, 3) and pixels.dtype == np.uint8
    x = normalize(pixels[None], viewer.inputs.spec.normalize)
    reference = keras.Model(model.inputs, [model.get_layer(n).output for n in ("relu1", "relu2", "logits")])
    relu1, relu2, logits = (np.asarray(t) for t in reference(x))
    maps = live.forward(pixels)["maps"]
    np.testing.assert_allclose(maps["relu1"], relu1[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(maps["relu2"], relu2[0], rtol=1e-5, atol=1e-5)
    z = np.exp(logits[0] - logits[0].max())
    top = live.predictions(pixels)
    assert [p["class"] for p in top] == list(np.argsort(-logits[0], kind="stable"))
    np.testing.assert_allclose([p["p"] for p in top], np.sort(z / z.sum())[::-1], rtol=1e-5)
    unit = live.unit(pixels, "relu2", 4, None)
    assert tuple(unit["at"]) == np.unravel_index(relu2[0, ..., 4].argmax(), relu2.shape[1:3])
    assert unit["max"] == pytest.approx(float(relu2[0, ..., 4].max()), rel=1e-5)
    # live deconv: the toolbox's seed (the channel's own map), through pipeline.backprop
    seed = np.zeros_like(relu2)
    seed[..., 4] = relu2[..., 4]
    want = np.asarray(backprop(model, x, "relu2", seed, "deconv"))[0]
    got = live.backprop(pixels, "relu2", 4, "deconv")
    from pipeline.render.draw import panel_to_uint8

    np.testing.assert_array_equal(got, panel_to_uint8(want, percentile=99.5))
    assert got.std() > 0


def test_uploads_are_bounded_and_decoded_like_the_dataset(viewer_run):
    _, run_dir, _ = viewer_run
    viewer = Viewer(run_dir, max_upload_mb=0.01)
    image = (np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)
    ref = viewer.inputs.upload(png_bytes(image))
    assert ref.startswith("u") and viewer.inputs.pixels(ref).shape == (24, 24, 3)
    with pytest.raises(ValueError, match="not a readable image"):
        viewer.inputs.upload(b"GIF89a but not really")
    with pytest.raises(ValueError, match="above the limit"):
        viewer.inputs.upload(b"\0" * 20000)


def test_stored_unit_pictures_come_from_results(viewer_run):
    _, run_dir, _ = viewer_run
    view = Viewer(run_dir, live=False).view
    with h5py.File(run_dir / "results.h5", "r") as f:
        image = f["layers/relu2/topk/image"][3]
        value = f["layers/relu2/topk/value"][3]
    unit = view.unit("relu2", 3)
    assert [e["image"] for e in unit["top"]] == [int(i) for i in image if i >= 0]
    np.testing.assert_allclose([e["value"] for e in unit["top"]], value[image >= 0], rtol=1e-6)
    for key in ("max_im", "max_deconv", "max_guided", "pattern"):
        assert unit[key].startswith("data:image/png;base64,"), key
    assert unit["card"] == "report/cards/relu2/unit_0003.jpg" and (run_dir / unit["card"]).is_file()
    assert unit["page"] == "report/relu2.html#u3"
    with pytest.raises(KeyError):
        view.unit("relu2", 6)
    assert view.patterns("relu1")["cols"] == 2 and view.patterns("relu2")["cols"] == 3


# ---------------------------------------------------------------- the server as a process


class Server:
    def __init__(self, run_dir: Path, *extra: str):
        env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.viewer", str(run_dir), "--port", "0", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.log = []
        deadline = time.time() + 120
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line and self.proc.poll() is not None:
                break
            self.log.append(line)
            m = re.search(r"viewer at (http://127\.0\.0\.1:(\d+)/)", line)
            if m:
                self.url, self.port = m[1], int(m[2])
                # keep reading its log: a full pipe would block the server's next log line
                threading.Thread(target=self._drain, daemon=True).start()
                return
        self.proc.kill()
        raise AssertionError("viewer did not start:\n" + "".join(self.log))

    def _drain(self) -> None:
        try:
            self.log.extend(self.proc.stdout)
        except (ValueError, OSError):  # closed by stop()
            pass

    def get(self, raw_path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.putrequest("GET", raw_path, skip_accept_encoding=True)  # the path exactly as written
        conn.endheaders()
        r = conn.getresponse()
        body = r.read()
        conn.close()
        return r.status, body

    def post(self, path: str, body: bytes, headers=None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", path, body=body, headers=headers or {})
        r = conn.getresponse()
        out = r.read()
        conn.close()
        return r.status, out

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def server(viewer_run):
    _, run_dir, tmp = viewer_run
    secret = tmp / "secret.txt"
    secret.write_text("not for the viewer")
    os.symlink(secret, run_dir / "sheets" / "link_out.txt")
    before = files_state(run_dir)
    s = Server(run_dir, "--max-upload-mb", "1")
    yield s, run_dir
    code = s.stop()
    assert code == 0, "".join(s.log)
    assert files_state(run_dir) == before  # nothing written into the run directory
    (run_dir / "sheets" / "link_out.txt").unlink()


def test_server_serves_run_files_and_refuses_everything_else(server):
    s, run_dir = server
    status, body = s.get("/run/index.html")
    assert status == 200 and body == (run_dir / "index.html").read_bytes()
    for bad in ("/run/../secret.txt", "/run/%2e%2e/secret.txt", "/run/..%2fsecret.txt", "/run//etc/passwd",
                "/run/sheets/link_out.txt", "/run/parts", "/../secret.txt", "/run/%2e%2e/%2e%2e/etc/passwd"):
        status, body = s.get(bad)
        assert status == 404 and b"not for the viewer" not in body and b"root:" not in body, bad
    assert s.get("/api/unit?image=0&layer=nope&unit=0")[0] == 404
    assert s.get("/api/unit?image=0&layer=relu2&unit=99")[0] == 404
    assert s.get("/api/unit?image=0&layer=relu2&unit=x")[0] == 400


def test_a_fault_of_ours_is_a_500_with_its_trace_not_a_404(viewer_run, caplog):
    _, run_dir, _ = viewer_run
    viewer = Viewer(run_dir, live=False)
    httpd = make_server(viewer)
    port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        host = {"Host": f"127.0.0.1:{port}"}
        assert request(port, "GET", "/api/patterns?layer=nope", host)[0] == 404  # asked for what is not there
        assert request(port, "GET", "/api/patterns", host)[0] == 400  # a parameter missing
        viewer.view.patterns = lambda layer: {}["cols"]  # a KeyError inside our own code
        with caplog.at_level("ERROR", logger="pipeline.viewer.server"):
            status, body = request(port, "GET", "/api/patterns?layer=relu1", host)
        assert status == 500 and b"KeyError" in body
        assert "Traceback" in caplog.text and "cols" in caplog.text
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_server_bounds_uploads(server):
    s, _ = server
    # refused from its Content-Length alone, before a byte of the body is read: the headers
    # are sent without it (a client still writing 2 MiB could meet the closed socket first)
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    conn.putrequest("POST", "/api/upload")
    conn.putheader("Content-Length", str(2 * 2**20))
    conn.endheaders()
    r = conn.getresponse()
    status, body = r.status, r.read()
    conn.close()
    assert status == 413 and b"limit" in body
    status, body = s.post("/api/upload", b"not an image", {"Content-Length": "12"})
    assert status == 400 and b"not a readable image" in body
    status, body = s.post("/api/upload", png_bytes(np.zeros((30, 30, 3), np.uint8)))
    assert status == 200 and b'"image": "u' in body


def test_server_listens_on_localhost_only(server):
    """The kernel's own table of listening sockets: the viewer's port is bound to 127.0.0.1."""
    s, _ = server
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.rsplit(":", 1)
            if state == "0A" and int(port, 16) == s.port:  # 0A: LISTEN
                listening.append(address)
    assert listening == ["0100007F"]  # 127.0.0.1, little-endian hex; nothing on 0.0.0.0 or ::


def request(port: int, method: str, path: str, headers: dict, body: bytes = b"") -> tuple[int, bytes]:
    """One request with exactly these headers (Host included: http.client adds none)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for key, value in {**headers, "Content-Length": str(len(body))}.items():
        conn.putheader(key, value)
    conn.endheaders(body)
    r = conn.getresponse()
    out = r.read()
    conn.close()
    return r.status, out


def test_server_answers_only_its_own_host_and_its_own_page_writes(server):
    """A DNS-rebound page names its own Host; a cross-site page posts a text/plain 'simple
    request' that no preflight stops: both are refused before anything is read or decoded."""
    s, run_dir = server
    own = f"127.0.0.1:{s.port}"
    for host in ("evil.example", f"evil.example:{s.port}", "127.0.0.1", f"127.0.0.1:{s.port + 1}", ""):
        for path in ("/api/run", "/run/results.h5"):
            status, body = request(s.port, "GET", path, {"Host": host} if host else {})
            assert status == 421 and b"not this viewer's address" in body and b"HDF" not in body, (host, path)
    for host in (own, f"localhost:{s.port}", f"LocalHost:{s.port}", f"[::1]:{s.port}"):
        status, body = request(s.port, "GET", "/run/results.h5", {"Host": host})
        assert status == 200 and body == (run_dir / "results.h5").read_bytes(), host
    image = png_bytes(np.full((20, 20, 3), 90, np.uint8))
    plain = {"Host": own, "Content-Type": "text/plain"}
    for foreign in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": f"http://localhost:{s.port + 1}"},
                    {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}, {"Sec-Fetch-Site": "same-site"}):
        status, body = request(s.port, "POST", "/api/upload", {**plain, **foreign}, image)
        assert status == 403 and b"only the viewer's own page" in body, foreign
    # a script on another site may not read a file either, even where CORS would hide the answer
    status, _ = request(s.port, "GET", "/run/results.h5", {"Host": own, "Sec-Fetch-Site": "cross-site",
                                                           "Sec-Fetch-Mode": "cors", "Origin": "http://evil.example"})
    assert status == 403
    same = {**plain, "Origin": f"http://{own}", "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
    status, body = request(s.port, "POST", "/api/upload", same, image)
    assert status == 200 and json.loads(body)["image"].startswith("u")


def test_server_stays_responsive_under_stalled_connections(server):
    import socket

    s, _ = server
    stalled = []
    try:
        for i in range(50):  # half send nothing, half stop in the middle of their headers
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            if i % 2:
                sock.sendall(f"GET /api/run HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\nX-Slow: ".encode())
            stalled.append(sock)
        started = time.perf_counter()
        status, body = s.get("/api/run")
        assert status == 200 and b"layers" in body
        assert time.perf_counter() - started < 2
    finally:
        for sock in stalled:
            sock.close()


def test_a_silent_client_is_dropped_after_the_timeout(viewer_run):
    import socket
    import threading

    from pipeline.viewer.server import make_server

    _, run_dir, _ = viewer_run
    server = make_server(Viewer(run_dir, live=False), "127.0.0.1", 0, timeout=0.5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as sock:
            started = time.perf_counter()
            assert sock.recv(100) == b""  # the server closed it: nothing sent, nothing answered
            assert 0.4 < time.perf_counter() - started < 5
    finally:
        server.shutdown()
        server.server_close()


def vm_kib(pid: int) -> dict:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines) if k in ("VmRSS", "VmHWM")}


def test_run_files_are_streamed_in_blocks(server):
    """Three readers of a 1 GiB file (sparse: no disk used) cost the server a few blocks,
    not three copies of the file; each gets every byte."""
    import threading

    s, run_dir = server
    big = run_dir / "big.bin"
    with open(big, "wb") as f:
        f.seek(2**30 - 3)
        f.write(b"END")
    try:
        before = vm_kib(s.proc.pid)
        got = []

        def fetch():
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=120)
            conn.request("GET", "/run/big.bin")
            r = conn.getresponse()
            size, last = 0, b""
            while block := r.read(2**20):
                size, last = size + len(block), (last + block)[-3:]
            got.append((r.status, size, last))
            conn.close()

        readers = [threading.Thread(target=fetch) for _ in range(3)]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
        after = vm_kib(s.proc.pid)
    finally:
        big.unlink()
    assert got == [(200, 2**30, b"END")] * 3
    grown = (after["VmHWM"] - before["VmRSS"]) / 2**10  # MiB; reading the file whole: +1024 per reader
    assert grown < 128, f"peak RSS grew by {grown:.0f} MiB"


# ---------------------------------------------------------------- the page, in Chromium


@pytest.fixture
def page(browser):
    context, pg = watched_page(browser, 1400, 900)
    yield pg
    context.close()


def settle(page) -> None:
    page.wait_for_function("document.getElementById('unit-pane').dataset.busy === '0'", timeout=60000)


def digest(page, selector: str) -> str:
    return hashlib.sha1(page.get_attribute(selector, "src").encode()).hexdigest()


def test_page_images_uploads_clicks_and_keys(server, page, tmp_path):
    s, run_dir = server
    page.goto(s.url)
    page.wait_for_selector("#tiles[src]")
    settle(page)
    assert page.locator("#top5 li").count() == 3  # the tiny model has 3 classes
    assert page.get_attribute("#unit-pane", "data-layer") == "relu1"
    first_tiles = digest(page, "#tiles")

    page.select_option("#image", "3")  # another dataset image: other activations
    page.wait_for_function(f"document.getElementById('unit-pane').dataset.image === '3'")
    settle(page)
    assert digest(page, "#tiles") != first_tiles

    upload = tmp_path / "drop.png"
    Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3))).save(upload)
    page.set_input_files("#upload", str(upload))
    page.wait_for_function("document.getElementById('unit-pane').dataset.image.startsWith('u')")
    settle(page)
    assert digest(page, "#tiles") != first_tiles

    box = page.locator("#tiles").bounding_box()  # relu1: 4 channels, 2 tiles a side: click the lower right
    page.mouse.click(box["x"] + box["width"] * 0.75, box["y"] + box["height"] * 0.75)
    page.wait_for_function("document.getElementById('unit-pane').dataset.unit === '3'")
    page.keyboard.press("j")
    page.wait_for_function("document.getElementById('unit-pane').dataset.unit === '2'")
    page.keyboard.press("o")  # next layer
    page.wait_for_function("document.getElementById('unit-pane').dataset.layer === 'relu2'")
    settle(page)
    page.keyboard.press("ArrowRight")
    page.wait_for_function("document.getElementById('unit-pane').dataset.unit === '3'")
    # a unit active on both the upload and image 1, so that its deconv is not blank on either
    ref = page.get_attribute("#unit-pane", "data-image")
    active = [u for u in range(6) if all(json.loads(s.get(f"/api/unit?image={i}&layer=relu2&unit={u}")[1])["max"] > 0
                                         for i in (ref, "1"))]
    for _ in range(abs(active[0] - 3)):
        page.keyboard.press("l" if active[0] > 3 else "j")
    page.wait_for_function(f"document.getElementById('unit-pane').dataset.unit === '{active[0]}'")
    page.keyboard.press("b")  # live deconv on
    page.wait_for_selector("#unit-backprop[src]")
    settle(page)
    deconv_on_upload = digest(page, "#unit-backprop")
    page.select_option("#image", "1")
    page.wait_for_function("document.getElementById('unit-pane').dataset.image === '1'")
    settle(page)
    assert digest(page, "#unit-backprop") != deconv_on_upload  # the live deconv follows the image
    for stored in ("#max-im", "#max-deconv", "#max-guided", "#pattern"):
        assert page.locator(stored).is_visible(), stored
    assert page.locator("#top-table tr").count() >= 1
    assert page.get_attribute("#card-link", "href") == f"/run/report/cards/relu2/unit_{active[0]:04d}.jpg"
    page.keyboard.press("s")  # pattern mode: the layer's filter patterns as tiles
    page.wait_for_selector("#tiles-wrap[data-mode=patterns]")
    settle(page)
    page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)
    assert page.errors == []


def test_page_without_a_model_keeps_the_stored_pictures(viewer_run, page, tmp_path):
    _, run_dir, tmp = viewer_run
    moved = tmp / "tiny.keras.moved"
    shutil.move(tmp / "tiny.keras", moved)
    try:
        s = Server(run_dir)
        try:
            page.goto(s.url)
            page.wait_for_function("document.getElementById('banner').textContent.includes('could not be loaded')")
            settle(page)
            page.wait_for_selector("#max-im[src]")
            page.keyboard.press("l")
            page.wait_for_function("document.getElementById('stored').dataset.unit === '1'")
            assert not page.locator("#unit-map").is_visible()
            assert page.errors == []
        finally:
            assert s.stop() == 0
    finally:
        shutil.move(moved, tmp / "tiny.keras")


def test_a_directory_that_is_not_a_run_is_one_error_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    for target in (tmp_path / "missing", tmp_path):
        r = subprocess.run([sys.executable, "-m", "pipeline.viewer", str(target), "--port", "0"],
                           capture_output=True, text=True, env=env, timeout=120)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1 and "results.h5" in errors[0], r.stderr
