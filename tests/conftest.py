import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from PIL import Image

import pipeline.config  # noqa: F401  (registers structured configs for compose())

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# CI runs `pytest -n 3 --dist loadfile`: each file goes whole to one worker, taken from a
# queue. xdist's default queue puts the files of many tests first, which left the longest
# files (few tests, each starting run.py) for the end, with the other workers idle: the
# queue follows this order instead, the files known longest first, then every file with a
# slow test, then the rest (a stable sort: tests keep their order within a file).
LONGEST_FILES = ("test_cli.py", "test_readme.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # present with pytest-xdist
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item):
        if item.path.name in LONGEST_FILES:
            return LONGEST_FILES.index(item.path.name)
        return len(LONGEST_FILES) + (item.path not in slow_files)

    items.sort(key=rank)


def save_image(path, array, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return str(path)


@pytest.fixture
def photo_folder(tmp_path):
    """A small class-folder dataset of real PNG/JPEG files, with an exact duplicate
    (ties across images) and a flat image (ties within an image)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    arrays = {}
    for i in range(7):
        arrays[f"a_cls/img{i}.png"] = (rng.random((40 + 3 * i, 48, 3)) * 255).astype(np.uint8)
    arrays["b_cls/dup_of_img0.png"] = arrays["a_cls/img0.png"]
    arrays["b_cls/flat.png"] = np.full((32, 32, 3), 200, np.uint8)
    for rel, a in arrays.items():
        save_image(root / rel, a)
    save_image(root / "b_cls/photo.jpg", (rng.random((50, 60, 3)) * 255).astype(np.uint8), quality=95)
    return root


# the headless browser of the HTML tests (Debian's chromium, driven by playwright)
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the HTML tests (skipped with a reason where it is missing)."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[test])")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield b
        b.close()


def watched_page(browser, width: int, height: int):
    """A new page whose console errors, page errors and failed requests collect in .errors."""
    context = browser.new_context(viewport={"width": width, "height": height})
    pg = context.new_page()
    pg.errors = []
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.on("requestfailed", lambda r: pg.errors.append(f"failed: {r.url}"))
    return context, pg
