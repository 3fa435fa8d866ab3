"""Every command line of the README's Usage block, run as written, as a process, in a
folder holding the files the commands name ($HOME/photos, list.txt, fmnist.keras,
net.keras) on small data: `dataset.limit=4` is added, and, where a command runs the
default stages, `stages=[scan,crop]` (the default job as a whole runs in test_cli).
A command that only names another dataset for the default job composes with
`--cfg job` and its dataset is listed in-process from the printed config: run.py on
folders and list files runs in test_cli and test_hostile, and the same stages run
here on the default dataset."""

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from omegaconf import OmegaConf

from conftest import save_image

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
SMALL = ["dataset.limit=4"]
FEW_STAGES = ["stages=[scan,crop]"]
L = keras.layers


def commands_in(block: str, prefix: str = "python") -> list[str]:
    """The command lines of a code block that start with `prefix`: continuation lines
    joined, comments dropped."""
    lines = (line.strip() for line in re.sub(r"\\\n\s*", " ", block).splitlines())
    return [line.split("  #")[0].strip() for line in lines if line.startswith(prefix)]


def usage_commands() -> list[str]:
    """The README's Usage block, one entry per command."""
    text = (ROOT / "README.md").read_text()
    return commands_in(text.split("## Usage", 1)[1].split("```bash", 1)[1].split("```", 1)[0])


def dataset_only(command: str) -> bool:
    """A run of the default job that overrides nothing but the dataset."""
    words = shlex.split(command)
    return words[:2] == ["python", "run.py"] and len(words) > 2 and all(w.startswith("dataset") for w in words[2:])


def tiny_model(path: Path, shape: tuple[int, int, int], classes: int) -> None:
    inp = keras.Input(shape)
    x = L.ReLU(name="relu1")(L.Conv2D(4, 3, name="conv1")(inp))
    out = L.Dense(classes, name="logits")(L.GlobalAveragePooling2D(name="gap")(x))
    keras.Model(inp, out).save(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("readme")
    home = work / "home"
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        path = home / "photos" / ("cat" if i % 2 else "dog") / f"img{i}.jpg"
        save_image(path, (rng.random((60 + 4 * i, 80, 3)) * 255).astype(np.uint8), quality=90)
        paths.append(path)
    (work / "list.txt").write_text("".join(f"{p} {i % 2}\n" for i, p in enumerate(paths)))
    tiny_model(work / "fmnist.keras", (28, 28, 1), 10)
    tiny_model(work / "net.keras", (96, 128, 3), 5)
    return work


def shell(command: str, work: Path, extra: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    words = shlex.split(command)
    assert words[0] == "python"
    words[0] = sys.executable
    if len(words) > 1 and words[1] == "run.py":
        words[1] = str(ROOT / "run.py")
    env = dict(os.environ, HOME=str(work / "home"), TF_CPP_MIN_LOG_LEVEL="2")
    # bash expands $HOME as a user's shell would; the words are quoted again for it
    line = " ".join(w if "$HOME" in w else shlex.quote(w) for w in words + extra)
    return subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_usage_block_is_what_this_test_runs():
    commands = usage_commands()
    assert len(commands) >= 10 and commands[0] == "python run.py --cfg job"
    assert any("fashion-mnist" in c and "model.path=fmnist.keras" in c for c in commands)  # joined lines


@pytest.mark.slow
def test_every_usage_command_runs_as_written(workdir):
    viewer, listed = None, 0
    for command in usage_commands():
        if "fashion-mnist" in command and not FASHION.exists():
            continue
        if command.startswith("python -m pipeline.viewer"):
            viewer = command  # after the runs it shows
            continue
        if command.startswith("python run.py --"):
            extra = []
        elif dataset_only(command):
            extra = ["--cfg", "job"]
        else:
            extra = SMALL + ([] if "stages=" in command else FEW_STAGES)
        proc = shell(command, workdir, extra)
        if "model.weights=imagenet" in command and proc.returncode != 0:
            # no network here: the download is refused with the one-line advice, nothing else
            errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and "offline?" in errors[0], proc.stderr[-2000:]
            continue
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
        if command == "python run.py --help":
            assert "== Stages" in proc.stdout and len(proc.stdout.splitlines()) <= 60
        if command == "python run.py --cfg job":
            assert "stages:" in proc.stdout and "dataset:" in proc.stdout
        if dataset_only(command):  # the files it names are found: 6 photos, 3 of each class
            from pipeline.datasets import list_images

            dataset = OmegaConf.create(proc.stdout).dataset
            dataset.path = str(workdir / dataset.path)  # list.txt is relative; $HOME/photos came expanded
            table = list_images(dataset)
            assert len(table) == 6 and sorted(np.bincount(table.labels)) == [3, 3], command
            listed += 1
    assert listed == 2  # $HOME/photos and list.txt
    with h5py.File(workdir / "runs" / "mnv2" / "results.h5", "r") as f:
        assert sorted(f["layers"]) == ["features_14_conv_0_2", "features_7_conv_0_2"]
        assert f["layers/features_7_conv_0_2/topk/value"].shape[1] == 16  # topk=16
    assert (workdir / "runs" / "mnv2" / "index.html").exists()  # stages=[report] drew it
    assert len(list((workdir / "multirun").glob("*/*/*/results.h5"))) == 2  # the sweep's two jobs
    assert viewer is not None
    serve_and_stop(viewer, workdir)


def serve_and_stop(command: str, work: Path) -> None:
    port = int(re.search(r"127\.0\.0\.1:(\d+)", (ROOT / "README.md").read_text()).group(1))
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            pytest.skip(f"port {port} is taken on this machine")
    words = shlex.split(command)
    proc = subprocess.Popen([sys.executable, *words[1:]], cwd=work, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
                    assert page.status == 200 and b"<html" in page.read(2000).lower()
                    break
            except OSError:
                assert time.monotonic() < deadline, "the viewer did not answer within 2 minutes"
                time.sleep(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def documented_commands() -> list[str]:
    """Every `python run.py` command line in README.md and docs/*.md code (fenced or
    indented), continuation lines joined, comments dropped, each once."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S) + re.findall(r"\n((?: {4}.*\n)+)", text)
        for block in blocks:
            found += commands_in(block, "python run.py")
    return list(dict.fromkeys(found))


def first_job(command: str) -> str:
    """A multirun command as its first job alone (`--cfg` does not combine with -m):
    the first value of each sweep, `range(n)` as 0."""
    words = []
    for word in shlex.split(command):
        if word in ("-m", "&"):  # a sweep; a shell loop's background job
            continue
        key, eq, value = word.partition("=")
        if eq and value[:1] not in "[{" and ("," in value or value.startswith("range(")):
            value = "0" if value.startswith("range(") else value.split(",")[0]
        words.append(shlex.quote(f"{key}{eq}{value}") if "$" not in word else word)
    return " ".join(words)


def test_every_documented_command_composes(tmp_path):
    """Hydra's grammar, the config groups and every key of every documented command: the
    config each would run (`--cfg job` composes it and stops before any stage; a sweep's
    first job; the shell loop's $i as 0)."""
    commands = documented_commands()
    assert len(commands) > 40
    (tmp_path / "home").mkdir()
    failed = []
    for command in commands:
        extra = [] if " --" in command else ["--cfg", "job"]
        proc = shell(first_job(command).replace("$i", "0"), tmp_path, extra, timeout=120)
        if proc.returncode != 0:
            failed.append(f"{command}\n    {proc.stderr.strip().splitlines()[-1:]}")
    assert not failed, "\n".join(failed)
