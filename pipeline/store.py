"""The results of a run: many small files written once, one index users open.

    run_dir/
      results.h5            the index: root attrs, groups and external links into parts/
                            (rebuilt from parts/ after every commit; it holds no data)
      parts/
        run.h5              root attrs, images/path, images/label, images/orientation (once per run directory)
        images.h5           images/scanned, images/ok, images/error
        <stage>.h5          a finished stage's results (long stages: virtual datasets
                            over their chunk files)
        <stage>.done        JSON: the stage's config fingerprint, the stages it read, a token
        <stage>.<print>/    work of a long stage: chunk files, scan checkpoints
        .<file>.sum         beside every part, chunk and checkpoint: its size and CRC-32,
                            verified before a resume or an assembly reuses the file
      .lock                 one writer per run directory (pipeline.lock)

Every file is written under a temporary name, fsynced and renamed, so a process killed
at any moment leaves the previous complete state, and the cost of a write is the size
of what is written, never that of the run. A user opens results.h5 and reads
f["layers/<layer>/topk/value"] as if it were one file; the parts must stay beside it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
import uuid
import zlib
from pathlib import Path

import h5py
import numpy as np

from pipeline.errors import PipelineError
from pipeline.names import exact_bytes, from_bytes, readable

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.h5"
PARTS_DIR = "parts"
RUN_PART = "run.h5"
IMAGES_PART = "images.h5"
STR = h5py.string_dtype("utf-8")

# what a run directory is about: every stage's results must agree on these
IDENTITY_KEYS = ("model", "dataset")


class StorageError(PipelineError):
    """The disk or a results file failed; the message says what to do."""


def stored_name(layer: str) -> str:
    """The name a layer is stored and drawn under: its HDF5 group, and every file and
    folder named after it. '/' (nested models) becomes '.', anything but letters, digits
    and . _ + = - becomes '_', and a name cannot be '.', '..' or start with '.'. The real
    name stays in the group's attrs."""
    name = re.sub(r"[^A-Za-z0-9._+=-]", "_", layer.replace("/", "."))
    return "_" + name if not name or name.startswith(".") else name


def fingerprint(cfg, keys) -> str:
    """Hash of the config values under `keys`: equal fingerprints, equal results."""
    from omegaconf import OmegaConf

    values = {}
    for key in keys:  # dotted keys name one field of a section
        value = OmegaConf.select(cfg, key)
        values[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- atomic files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_full(err: BaseException) -> bool:
    return getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)


def storage_error(err: OSError, path: Path) -> StorageError:
    if disk_full(err):
        return StorageError(f"disk full while writing {path}: free space on that disk and run the same "
                            f"command again (the last complete results are kept)")
    return StorageError(f"cannot write {path}: {err}")


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb"):
    """A plain file written under a temporary name, fsynced, then renamed to `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        raise storage_error(err, path) from err
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing(path: Path):
    """A temporary path (same suffix, so writers that go by it still do) renamed to `path`
    once the block succeeds: a kill leaves the old file or the new one, never a part of
    one. Not fsynced: for files redrawn from results.h5 (the report); a left temporary is
    removed by the next run (Store.clean_temporaries)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise storage_error(err, path) from err
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- checksums
#
# Every part, chunk and scan checkpoint has a sidecar `.<name>.sum` beside it: one line
# "<size> <crc32>" per version of the file it accepts. CRC-32 (zlib): it detects damage
# (flipped bytes, truncation), which is all a resume needs, at twice the speed of sha256 here.
# The sidecar is written before the file is renamed into place and keeps the previous
# version's line, so a kill between the two renames leaves a pair that still verifies.

SUM_SUFFIX = ".sum"
_BLOCK = 8 * 2**20
_trusted: dict[str, tuple] = {}  # path -> (inode, size, mtime) of files this process wrote or verified


def sum_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}{SUM_SUFFIX}")


def checksum(data) -> str:
    return f"{len(data)} {zlib.crc32(data):08x}"


def _file_checksum(path: Path) -> str:
    crc, size = 0, 0
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            crc, size = zlib.crc32(block, crc), size + len(block)
    return f"{size} {crc:08x}"


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def write_checked(path: Path, data) -> None:
    """`data` (bytes) written under a temporary name and fsynced; its checksum into the
    sidecar; then renamed to `path`."""
    path = Path(path)
    side, tmp = sum_path(path), path.with_name(f".{path.name}.tmp-{os.getpid()}")
    side_tmp = side.with_name(f"{side.name}.tmp-{os.getpid()}")
    lines = [checksum(data)]
    with contextlib.suppress(OSError, ValueError):  # the version in place stays valid until the rename
        lines += [line for line in side.read_text().splitlines()[:1] if line and line != lines[0]]
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # the sidecar is not fsynced: after a power loss a stale one only makes the file
        # be computed again; one directory fsync then covers both renames
        side_tmp.write_text("\n".join(lines) + "\n")
        os.replace(side_tmp, side)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        raise storage_error(err, path) from err
    finally:
        tmp.unlink(missing_ok=True)
        side_tmp.unlink(missing_ok=True)
    _trusted[str(path)] = _stamp(path)


def damage(path: Path) -> str | None:
    """Why `path` cannot be trusted (missing, no checksum, truncated, bytes changed), or None
    when its bytes are those written. Reads the whole file once per process (files this
    process wrote, unchanged since, are not read again)."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if _trusted.get(str(path)) == _stamp(path):
        return None
    try:
        accepted = [line.strip() for line in sum_path(path).read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return f"no checksum recorded ({sum_path(path).name} is missing)"
    sizes = [line.split()[0] for line in accepted]  # versions of one file often have one size
    size = path.stat().st_size
    if str(size) not in sizes:  # a cheap first test: no read
        return f"{size} bytes where {' or '.join(sizes) or 'others'} were written (truncated or grown)"
    if _file_checksum(path) not in accepted:
        return "its bytes changed since they were written (checksum mismatch)"
    _trusted[str(path)] = _stamp(path)
    return None


def remove_checked(path: Path) -> None:
    """A file and its checksum."""
    Path(path).unlink(missing_ok=True)
    sum_path(path).unlink(missing_ok=True)
    _trusted.pop(str(path), None)


@contextlib.contextmanager
def atomic_h5(path: Path, checked: bool = False):
    """A new HDF5 file, built in memory, then written under a temporary name, fsynced and
    renamed to `path`. An exception inside the block leaves `path` as it was. `checked`:
    the checksum of the bytes written goes into the sidecar (hashed from memory).

    HDF5 never writes to the disk itself: a full disk fails our plain write with one
    clear error, instead of failing inside HDF5, whose state is not to be trusted after
    a failed write (tracebacks at close, then crashes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # where relative links resolve from
    f = h5py.File(name, "w", driver="core", backing_store=False)  # libver latest: images taken while open do not reopen
    try:
        yield f
        f.flush()
        image = f.id.get_file_image()
    finally:
        f.close()
    if checked:
        write_checked(path, image)
        return
    with atomic_file(path) as fh:
        fh.write(image)


def open_h5(path: Path, what: str = "results file") -> h5py.File:
    """Open an HDF5 file for reading; an unreadable one is a one-line error."""
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise StorageError(f"{path} does not exist") from None
    except OSError as err:
        raise StorageError(f"{path} is not a readable {what} (truncated, or not HDF5: {err}): "
                           f"remove it and run the stage that writes it again") from None


# --------------------------------------------------------------------------- the run directory


class Store:
    """The parts of one run directory and the index that ties them together.

    Writing needs the run directory's lock (pipeline.lock); reading does not.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.parts = self.run_dir / PARTS_DIR
        self.index = self.run_dir / RESULTS_FILE

    # ---------------------------------------------------------------- bookkeeping

    def markers(self) -> dict[str, dict]:
        """stage -> its done marker (fingerprint, depends_on, token)."""
        found = {}
        if self.parts.is_dir():
            for path in sorted(self.parts.glob("*.done")):
                try:
                    found[path.stem] = json.loads(path.read_text())
                except (OSError, ValueError) as err:
                    raise StorageError(f"{path} is unreadable ({err}): remove it to run stage {path.stem} again") \
                        from None
        return found

    def stages_done(self) -> dict[str, str]:
        """Stage name -> fingerprint of the config it ran with."""
        return {stage: m["fingerprint"] for stage, m in self.markers().items()}

    def is_run_dir(self) -> bool:
        return (self.parts / RUN_PART).exists()

    def begin(self, stage: str, recompute: bool) -> None:
        """Before `stage` runs: it and every stage built on its results stop being done.
        `recompute`: its finished work is thrown away (otherwise unfinished work of the
        same config is resumed)."""
        markers = self.markers()
        dropped = self._dependents(stage, markers)
        for other in dropped:
            self._remove_stage(other)
            logger.info("stage %s is recomputed: its results built on %s are removed", other, stage)
        if stage in markers:
            (self.parts / f"{stage}.done").unlink()
            if recompute:
                self._remove_stage(stage)
            dropped.add(stage)
        if dropped:
            self.rebuild()

    @staticmethod
    def _dependents(stage: str, markers: dict[str, dict]) -> set[str]:
        found, frontier = set(), [stage]
        while frontier:
            current = frontier.pop()
            for other, m in markers.items():
                if current in m.get("depends_on", ()) and other not in found and other != stage:
                    found.add(other)
                    frontier.append(other)
        return found

    def _remove_stage(self, stage: str) -> None:
        (self.parts / f"{stage}.done").unlink(missing_ok=True)
        remove_checked(self.parts / f"{stage}.h5")
        for work in self.parts.glob(f"{stage}.*"):
            if work.is_dir():
                shutil.rmtree(work)

    def finish(self, stage: str, stage_print: str, depends_on=()) -> None:
        """Record `stage` as done with config fingerprint `stage_print`; results.h5 then shows it."""
        self.parts.mkdir(parents=True, exist_ok=True)
        marker = dict(fingerprint=stage_print, depends_on=sorted(set(depends_on)), token=uuid.uuid4().hex,
                      part=f"{stage}.h5" if self.has(f"{stage}.h5") else None)  # checked before it is reused
        with atomic_file(self.parts / f"{stage}.done", "w") as fh:
            json.dump(marker, fh, sort_keys=True)
        for work in self.parts.glob(f"{stage}.*"):  # work of other configs is of no use now
            if work.is_dir() and work.name != f"{stage}.{stage_print}":
                shutil.rmtree(work)
        self.rebuild()

    def remove_all(self) -> None:
        """Forget every result of this run directory (overwrite=true with another model or dataset)."""
        if self.parts.exists():
            shutil.rmtree(self.parts)
        self.index.unlink(missing_ok=True)

    def clean_temporaries(self) -> None:
        """Temporary files of killed writers, anywhere in the run directory (parts, chunks,
        report files); only the lock holder calls this."""
        if self.run_dir.is_dir():
            for tmp in self.run_dir.rglob(".*.tmp-*"):
                if tmp.is_file():
                    tmp.unlink(missing_ok=True)

    def check(self, recomputed=(), repair: bool = True) -> None:
        """Before a run reuses anything: every finished stage's part file (and the run's
        images record) holds the bytes that were written. A finished stage whose part is
        gone is no longer done (with `repair`, the lock holder's: it runs again when
        listed); a damaged part is a one-line error naming the file and the command that
        rebuilds it. Stages in `recomputed` (overwrite=true) are not checked. Cost: one
        read of the part files, which hold tables and links (the bulk lives in chunk
        files, checked when their stage resumes or assembles)."""
        for stage, marker in self.markers().items():
            part = marker.get("part")  # markers of older versions name none: nothing to check against
            if not part or stage in recomputed:
                continue
            path = self.parts / part
            why = damage(path)
            if why == "missing" and repair:
                logger.warning("%s is missing: stage %s is not done any more, it runs again when listed in stages",
                               path, stage)
                (self.parts / f"{stage}.done").unlink()
                sum_path(path).unlink(missing_ok=True)
            elif why:
                raise StorageError(f"{path} is {'missing' if why == 'missing' else f'damaged ({why})'}: run "
                                   f"stages=[{stage}] overwrite=true hydra.run.dir={self.run_dir} to rebuild it "
                                   f"(and the stages built on it)")
        rebuild_images = f"run stages=[scan] overwrite=true hydra.run.dir={self.run_dir} to rebuild it"
        for name, hint in ((RUN_PART, "run the stages again in a new hydra.run.dir"), (IMAGES_PART, rebuild_images)):
            path = self.parts / name
            if path.exists() and sum_path(path).exists() and (why := damage(path)):
                raise StorageError(f"{path} is damaged ({why}): {hint}")

    # ---------------------------------------------------------------- writing

    def write(self, name: str):
        """A new part file parts/<name> (context manager yielding the h5py.File)."""
        return atomic_h5(self.parts / name, checked=True)

    def copy_part(self, source: Path, name: str, **attrs) -> None:
        """parts/<name> as a copy of another run's part file, with root attrs changed
        (changed in memory, then written like every part)."""
        buffer = io.BytesIO(Path(source).read_bytes())
        try:
            with h5py.File(buffer, "r+") as f:
                f.attrs.update(attrs)
        except OSError as err:
            raise StorageError(f"{source} is not a readable part file ({err})") from None
        self.parts.mkdir(parents=True, exist_ok=True)
        write_checked(self.parts / name, buffer.getbuffer())

    def has(self, name: str) -> bool:
        return (self.parts / name).exists()

    def part_print(self, name: str) -> str | None:
        """The config fingerprint a part was written for (attr `_stage_print`), if any."""
        if not self.has(name) or damage(self.parts / name):
            return None
        with open_h5(self.parts / name, "part file") as f:
            value = f.attrs.get("_stage_print")
        return None if value is None else str(value)

    def work(self, stage: str, stage_print: str, overwrite: bool, **resume_keys) -> "WorkDir":
        """The work folder of a long stage for this config. Work of another config is removed
        with overwrite=true and refused otherwise; work of this config started with other
        `resume_keys` (e.g. batch_size) is refused, since its results would differ."""
        for other in self.parts.glob(f"{stage}.*"):
            if other.is_dir() and other.name != f"{stage}.{stage_print}":
                if not overwrite:
                    raise PipelineError(f"{self.run_dir} holds an unfinished {stage} of a different config: pass "
                                        f"overwrite=true to start it again, or choose a new hydra.run.dir")
                shutil.rmtree(other)
        return WorkDir(self.parts / f"{stage}.{stage_print}", stage, resume_keys)

    # ---------------------------------------------------------------- the index

    def sources(self) -> list[str]:
        """Part files the index is made of, in order: run, images, then done stages."""
        names = [n for n in (RUN_PART, IMAGES_PART) if self.has(n)]
        names += [f"{stage}.h5" for stage in self.markers() if self.has(f"{stage}.h5")]
        return names

    def rebuild(self) -> None:
        """Write results.h5 anew from the parts: groups mirror theirs, datasets and
        groups that only one part holds become external links. Cost: the number of
        objects, never the bytes of data."""
        if not self.is_run_dir():
            return
        files = []
        try:
            for name in self.sources():
                files.append((f"{PARTS_DIR}/{name}", open_h5(self.parts / name, "part file")))
            with atomic_h5(self.index) as out:
                for _, src in files:  # '_' attrs are a part's own bookkeeping
                    out.attrs.update({k: v for k, v in src.attrs.items() if not k.startswith("_")})
                out.attrs["stages_done"] = json.dumps(self.stages_done(), sort_keys=True)
                _mirror(out, "", files)
        finally:
            for _, f in files:
                f.close()

    def mend(self) -> None:
        """Rebuild results.h5 when it is missing, unreadable or older than a part (a kill
        between a commit and the index); leave it untouched otherwise."""
        if not self.is_run_dir():
            return
        newest = max(p.stat().st_mtime_ns for p in self.parts.glob("*") if p.suffix in (".h5", ".done"))
        try:
            fresh = self.index.stat().st_mtime_ns >= newest
            if fresh:
                with h5py.File(self.index, "r") as f:
                    fresh = json.loads(f.attrs.get("stages_done", "{}")) == self.stages_done()
        except (OSError, ValueError):
            fresh = False
        if not fresh:
            logger.info("rebuilding %s from %s/", self.index, PARTS_DIR)
            self.rebuild()

    def require(self, hint: str) -> Path:
        """results.h5 of a run directory that holds finished results; otherwise a one-line
        error naming what to run (`hint`, e.g. 'stages=[scan,crop,report]')."""
        self.open().close()
        if not self.stages_done():
            raise StorageError(f"{self.run_dir} holds no finished stage yet: run {hint} first")
        return self.index

    def open(self) -> h5py.File:
        """results.h5 for reading (an h5py.File); a missing or broken one is a one-line error."""
        if not self.index.exists():
            raise StorageError(f"no {RESULTS_FILE} in {self.run_dir}: run stages=[scan] first")
        if not self.is_run_dir():
            raise StorageError(f"{self.run_dir} is not a cnn-lens run directory ({RESULTS_FILE} without its "
                               f"{PARTS_DIR}/ folder): choose the run directory itself, or a new hydra.run.dir")
        return open_h5(self.index)

    # ---------------------------------------------------------------- the run record

    def write_run(self, cfg, model_name: str, spec, table, weights_sha256: str = "",
                  imagenet_classes: bool = False, **extra) -> None:
        """parts/run.h5: the root attrs and the image list (paths, labels; `table` None for
        stages that read no dataset)."""
        with self.write(RUN_PART) as f:
            write_run_attrs(f, cfg, model_name, spec, weights_sha256, imagenet_classes, **extra)
            f.attrs["images_sha256"] = "" if table is None else table_digest(table)
            if table is not None:
                g = f.create_group("images")
                write_paths(g, "path", table.paths)
                g["label"] = table.labels.astype(np.int64)
                g.attrs["class_names"] = json.dumps(list(table.class_names))
                g["orientation"] = applied_orientations(table)
        self.rebuild()  # results.h5 opens from the first moment of a run

    def ensure_run(self, cfg, bundle, table=None) -> None:
        """The run record, when no earlier stage wrote one (or one without the image list)."""
        if self.has(RUN_PART):
            if table is None:
                return
            with open_h5(self.parts / RUN_PART, "part file") as f:
                if "images" in f:
                    return
        self.write_run(cfg, bundle.name, bundle.preprocessing, table, bundle.weights_sha256,
                       bundle.imagenet_classes, random_weights=bundle.random_weights)

    def write_images(self, n_images: int, errors: dict[int, str], scanned: np.ndarray | None = None,
                     replace: bool = True) -> None:
        """parts/images.h5: which images were read (`scanned`, default all) and which of
        them could not be (errors: id -> reason). replace=False keeps an existing record."""
        if not replace and self.has(IMAGES_PART):
            return
        scanned = np.ones(n_images, bool) if scanned is None else scanned
        ok = scanned.copy()
        ok[list(errors)] = False
        reasons = np.where(scanned, "", "not in this shard").astype(object)
        for i, reason in errors.items():
            reasons[i] = reason
        with self.write(IMAGES_PART) as f:
            g = f.create_group("images")
            g["scanned"], g["ok"] = scanned, ok
            write_strings(g, "error", reasons)


def _mirror(out: h5py.Group, path: str, files: list[tuple[str, h5py.File]]) -> None:
    """Mirror the group `path` of every file into `out`: a child only one file has is
    linked; a child several files have must be a group there, mirrored in turn."""
    owners: dict[str, list[tuple[str, h5py.File]]] = {}
    for rel, f in files:
        group = f[path] if path else f
        if path:
            out.attrs.update(dict(group.attrs))
        for name in group:
            owners.setdefault(name, []).append((rel, f))
    for name, holders in owners.items():
        child = f"{path}/{name}" if path else name
        if len(holders) == 1:
            out[name] = h5py.ExternalLink(holders[0][0], "/" + child)
            continue
        kinds = {f.get(child, getclass=True) for _, f in holders}
        if kinds != {h5py.Group}:
            raise StorageError(f"{child} is written by several parts ({', '.join(r for r, _ in holders)}): "
                               f"remove the older one")
        _mirror(out.create_group(name), child, holders)


# --------------------------------------------------------------------------- chunks of a long stage


class WorkDir:
    """The chunk files of one long stage for one config, each written once.

    A stage writes its work as numbered chunks; started again after a kill it skips
    the chunks that exist; `assemble` then presents their datasets, concatenated
    along the first axis in chunk order, as virtual datasets of the stage's part.
    """

    RESUME = "resume.json"

    def __init__(self, path: Path, stage: str, resume_keys: dict):
        self.path, self.stage = Path(path), stage
        self.path.mkdir(parents=True, exist_ok=True)
        saved = self.path / self.RESUME
        keys = json.loads(json.dumps(resume_keys))
        if saved.exists():
            before = json.loads(saved.read_text())
            changed = {k: (before.get(k), v) for k, v in keys.items() if before.get(k) != v}
            if changed:
                said = ", ".join(f"{k}={old}" for k, (old, _) in changed.items())
                raise PipelineError(f"the interrupted {stage} in {self.path.parent.parent} ran with {said}: "
                                    f"resume with {said}, or pass overwrite=true to start it again")
        elif keys:
            with atomic_file(saved, "w") as fh:
                json.dump(keys, fh, sort_keys=True)

    def chunk_name(self, number: int) -> str:
        return f"{number:06d}.h5"

    def chunks(self) -> list[str]:
        """Committed chunk files whose bytes verify, in order. A damaged one (or one without
        its checksum) is removed with a warning, so the stage computes it again."""
        good = []
        for name in self._files():
            why = damage(self.path / name)
            if why:
                logger.warning("%s: %s; it is computed again", self.path / name, why)
                remove_checked(self.path / name)
            else:
                good.append(name)
        return good

    def resuming(self, done: int, total: int, unit: str) -> None:
        """Say, once, how much of the work a killed run had committed (nothing when none)."""
        if done:
            logger.info("%s: resuming, %d of %d %s already done", self.stage, done, total, unit)

    def _files(self) -> list[str]:
        return sorted(p.name for p in self.path.glob("[0-9]*.h5"))

    def remove(self, name: str) -> None:
        remove_checked(self.path / name)

    def write(self, name: str):
        return atomic_h5(self.path / name, checked=True)

    def open(self, name: str) -> h5py.File:
        return open_h5(self.path / name, "chunk file")

    def assemble(self, out: h5py.File, names: list[str] | None = None, skip: tuple[str, ...] = ()) -> None:
        """Virtual datasets in `out` over the datasets of the chunks `names` (default all):
        each path's pieces concatenated along axis 0 in chunk order; attrs from the first
        piece, group attrs from the first chunk that has the group. Top-level names in
        `skip` (per-chunk bookkeeping) are left out."""
        names = self._files() if names is None else names
        for name in names:  # never a virtual dataset over bytes that changed since they were written
            why = damage(self.path / name)
            if why:
                remove_checked(self.path / name)
                raise StorageError(f"{self.path / name} changed after it was written ({why}): it is removed; "
                                   f"run the same command again to compute it again")
        pieces: dict[str, list] = {}
        attrs: dict[str, dict] = {}
        for name in names:
            rel = f"{self.path.name}/{name}"
            with self.open(name) as f:
                def visit(key, obj, rel=rel):
                    if key.split("/")[0] in skip:
                        return
                    if isinstance(obj, h5py.Dataset):
                        pieces.setdefault(key, []).append((rel, obj.shape, obj.dtype))
                    attrs.setdefault(key, dict(obj.attrs))
                f.visititems(visit)
        for key, group_attrs in attrs.items():
            if key not in pieces:
                out.require_group(key).attrs.update(group_attrs)
        for key, parts in pieces.items():
            tail, dtype = parts[0][1][1:], parts[0][2]
            if any(shape[1:] != tail or d != dtype for _, shape, d in parts):
                raise StorageError(f"chunks of {self.path} disagree on the shape of {key}: "
                                   f"remove {self.path} and run stage {self.stage} again")
            total = sum(shape[0] for _, shape, _ in parts)
            layout = h5py.VirtualLayout((total,) + tail, dtype)
            start = 0
            for rel, shape, _ in parts:
                if shape[0]:
                    layout[start:start + shape[0]] = h5py.VirtualSource(rel, key, shape=shape, dtype=dtype)
                start += shape[0]
            out.create_virtual_dataset(key, layout)
            out[key].attrs.update(attrs[key])


class Pacer:
    """When a long stage commits: every `checkpoint.seconds`, and every `checkpoint.batches`
    batches when set. Time, not batch counts, so a faster device does not commit more often."""

    def __init__(self, checkpoint):
        self.seconds = float(checkpoint.seconds)
        self.batches = None if checkpoint.batches is None else int(checkpoint.batches)
        self.count = 0
        self.last = time.monotonic()

    def due(self) -> bool:
        """Count one batch; True when a commit is due now."""
        self.count += 1
        now = time.monotonic()
        if (self.batches and self.count % self.batches == 0) or now - self.last >= self.seconds:
            self.last = now
            return True
        return False


def block_bytes(checkpoint) -> int:
    """`checkpoint.block_mb` in bytes."""
    return max(1, int(float(checkpoint.block_mb) * 2**20))


# --------------------------------------------------------------------------- helpers


def applied_orientations(table) -> np.ndarray:
    """int8 (N,): the EXIF orientation (1..8) each image is turned upright by; 1 for images
    without one, for in-memory arrays and with dataset.exif=false. Only file headers are
    read (4 KiB each, a few threads: the files' reads overlap)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.preprocess import file_orientation

    if table.arrays is not None or not getattr(table, "exif", True) or not table.paths:
        return np.ones(len(table.paths), np.int8)
    with ThreadPoolExecutor(8) as pool:
        return np.fromiter(pool.map(file_orientation, table.paths), np.int8, len(table.paths))


def table_digest(table) -> str:
    """sha256 of a dataset's image list (paths and labels): shards of one dataset agree on it."""
    h = hashlib.sha256("\0".join(table.paths).encode("utf-8", "surrogateescape"))
    h.update(np.ascontiguousarray(table.labels, np.int64).tobytes())
    return h.hexdigest()


def write_run_attrs(f: h5py.File, cfg, model_name: str, spec, weights_sha256: str = "",
                    imagenet_classes: bool = False, **extra) -> None:
    """The root attrs every results.h5 carries, whichever stage creates it."""
    import dataclasses

    from omegaconf import OmegaConf

    import pipeline

    f.attrs.update(
        config=readable(OmegaConf.to_yaml(cfg, resolve=True)), identity=fingerprint(cfg, IDENTITY_KEYS),
        model=model_name,
        input_size=np.asarray(spec.size, np.int64),
        preprocessing=json.dumps(dataclasses.asdict(spec), sort_keys=True), version=pipeline.__version__,
        weights_sha256=weights_sha256, imagenet_classes=imagenet_classes, **extra)


def write_strings(group: h5py.Group, name: str, values) -> None:
    """UTF-8 text; bytes of a name that are not UTF-8 are written as a visible `\\xNN`."""
    group.create_dataset(name, data=np.asarray([readable(str(v)) for v in values], dtype=object), dtype=STR)


def read_strings(dataset: h5py.Dataset) -> list[str]:
    return list(dataset.asstr()[()])


def write_paths(group: h5py.Group, name: str, paths) -> None:
    """`name`: the paths as readable UTF-8 text. `name`_bytes (uint8) and `name`_offsets
    (int64, N + 1): every path's exact bytes, path i at bytes[offsets[i]:offsets[i + 1]],
    so a name that is not UTF-8 still finds its file."""
    paths = list(paths)
    write_strings(group, name, paths)
    raw = [exact_bytes(p) for p in paths]
    offsets = np.zeros(len(raw) + 1, np.int64)
    np.cumsum([len(r) for r in raw], out=offsets[1:])
    group[f"{name}_bytes"] = np.frombuffer(b"".join(raw), np.uint8)
    group[f"{name}_offsets"] = offsets


def read_paths(group: h5py.Group, name: str = "path") -> list[str]:
    """The paths `write_paths` stored, exactly as the file system knows them
    (surrogate-escaped str); a run written before `_bytes` existed gives its text."""
    if f"{name}_bytes" not in group:
        return read_strings(group[name]) if name in group else []
    raw = group[f"{name}_bytes"][()].tobytes()
    offsets = group[f"{name}_offsets"][()].tolist()
    return [from_bytes(raw[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def read_path(group: h5py.Group, image_id: int, name: str = "path") -> str:
    """One path of `read_paths`, reading only its own bytes."""
    if f"{name}_bytes" not in group:
        return read_strings(group[name][image_id:image_id + 1])[0]
    a, b = (int(v) for v in group[f"{name}_offsets"][image_id:image_id + 2])
    return from_bytes(group[f"{name}_bytes"][a:b].tobytes())


def walk(f: h5py.Group, prefix: str = ""):
    """(path, dataset) of every dataset under `f`, following the external links of
    results.h5 (h5py's visititems does not follow them)."""
    for name in f:
        obj = f[name]
        path = f"{prefix}{name}"
        if isinstance(obj, h5py.Dataset):
            yield path, obj
        else:
            yield from walk(obj, path + "/")


def pack(index: Path, out: Path, block_bytes: int = 64 * 2**20) -> None:
    """One self-contained HDF5 file with everything results.h5 shows (links and virtual
    datasets resolved), for sending a run elsewhere; also the 'fresh copy' that measures
    how much of a run directory is live data. Compressed like the parts."""
    with open_h5(Path(index)) as src, atomic_h5(Path(out)) as dst:
        dst.attrs.update(dict(src.attrs))
        _pack_group(src, dst, block_bytes)


def _pack_group(src: h5py.Group, dst: h5py.Group, block_bytes: int) -> None:
    for name in src:
        obj = src[name]
        if isinstance(obj, h5py.Group):
            g = dst.create_group(name)
            g.attrs.update(dict(obj.attrs))
            _pack_group(obj, g, block_bytes)
            continue
        options = {}
        if obj.shape and obj.size:
            row = max(1, obj.dtype.itemsize * int(np.prod(obj.shape[1:], dtype=np.int64)))
            options = dict(chunks=(max(1, min(obj.shape[0], (1 << 20) // row)),) + obj.shape[1:])
            if obj.ndim > 2 or _compressed(obj):
                options.update(compression="gzip", shuffle=True)
        d = dst.create_dataset(name, shape=obj.shape, dtype=obj.dtype, **options)
        if not obj.shape:
            d[()] = obj[()]
        elif obj.size:
            rows = max(1, block_bytes // row)
            for start in range(0, obj.shape[0], rows):
                d[start:start + rows] = obj[start:start + rows]
        d.attrs.update(dict(obj.attrs))


def _compressed(d: h5py.Dataset) -> bool:
    if d.is_virtual:
        sources = d.virtual_sources()
        if not sources:
            return False
        folder = Path(d.file.filename).parent
        with h5py.File(folder / sources[0].file_name, "r") as f:
            return f[sources[0].dset_name].compression is not None
    return d.compression is not None


def verify_all(run_dir: Path) -> list[str]:
    """'<file>: <why>' for every file under the run directory's parts/ whose checksum does
    not hold (or whose checksum outlived it); reads every byte once."""
    found = []
    for side in sorted(Path(run_dir, PARTS_DIR).rglob(f".*{SUM_SUFFIX}")):
        path = side.with_name(side.name[1:-len(SUM_SUFFIX)])
        why = damage(path)
        if why:
            found.append(f"{path}: {why}")
    return found


def main(argv=None) -> None:
    """python -m pipeline.store pack RUN_DIR OUT.h5: one self-contained copy of a run's results.
    python -m pipeline.store verify RUN_DIR: read every part, chunk and checkpoint and check its checksum."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.store", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write every dataset results.h5 shows into one file")
    p.add_argument("run_dir", type=Path)
    p.add_argument("out", type=Path)
    v = sub.add_parser("verify", help="read every part, chunk and checkpoint and check its checksum")
    v.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        store = Store(args.run_dir)
        store.open().close()  # a missing or foreign run directory is one line
        if args.command == "verify":
            logging.basicConfig(level=logging.INFO, format="%(message)s")
            damaged = verify_all(store.run_dir)
            for line in damaged:
                logger.error("damaged: %s", line)
            if damaged:
                raise SystemExit(2)
            logger.info("%s: every checksum holds", store.run_dir)
            return
        pack(store.index, args.out)
    except PipelineError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
