"""Per-image stages (cam, occlusion, activations) stream their images and commit what
they computed as chunk files, so a killed run resumes after the last chunk.

A chunk is committed every `checkpoint.seconds` (or `checkpoint.batches`), and
whenever its rows pass `checkpoint.block_mb`, always at a batch boundary. It records where the
image stream stood (position and the ids TensorFlow dropped so far): a resumed stream
forms its batches from the same images as an uninterrupted one. The images that
TensorFlow could not decode are retried with Pillow at the end, in one last chunk
that also lists the images neither could read.
"""

from __future__ import annotations

import logging

import numpy as np

from pipeline.datasets import BatchStream
from pipeline.store import Pacer, WorkDir, block_bytes, read_strings, write_strings

logger = logging.getLogger(__name__)

BOOKKEEPING = ("_dropped", "_errors")


def _unbroken(work: WorkDir) -> list[str]:
    """The verified chunks 0..n-1 before the first missing or damaged one. Only the last
    chunk says where the stream stood, so the chunks after a gap are removed and computed
    again with it: the rows of a lost chunk come back, never a hole."""
    chunks = work.chunks()
    n = next((i for i, name in enumerate(chunks) if name != work.chunk_name(i)), len(chunks))
    if n < len(chunks):
        logger.warning("%s: chunk %s is missing; it and the %d chunk(s) after it are computed again", work.path,
                       work.chunk_name(n), len(chunks) - n)
        for name in chunks[n:]:
            work.remove(name)
    return chunks[:n]


class ChunkedStream:
    """Batches of `ids` not yet committed in `work`; `add` the rows computed for each."""

    def __init__(self, work: WorkDir, table, spec, batch_size: int, ids: np.ndarray, checkpoint):
        self.work, self.ids = work, np.asarray(ids, np.int64)
        self.pacer = Pacer(checkpoint)
        self.budget = block_bytes(checkpoint)
        self.rows: dict[str, list[np.ndarray]] = {}
        self.bytes = 0
        self.errors: dict[int, str] = {}
        position, dropped, self.finished = 0, [], False
        chunks = _unbroken(work)
        self.next_chunk = len(chunks)
        if chunks:  # where the last commit left the stream (the Pillow pass, if any, is always last)
            with work.open(chunks[-1]) as f:
                position, self.finished = int(f.attrs["_position"]), bool(f.attrs["_fallback"])
                dropped = f["_dropped"][()].tolist()
                if "_errors" in f:
                    self.errors.update(zip(f["_errors/image"][()].tolist(), read_strings(f["_errors/reason"])))
        work.resuming(len(self.ids) if self.finished else position, len(self.ids), "images")
        self.stream = BatchStream(table, spec, batch_size, ids=self.ids[position:], dropped=dropped)
        self.offset = position
        self.in_fallback = False

    @property
    def remaining(self) -> int:
        return 0 if self.finished else len(self.ids) - self.offset

    def __iter__(self):
        if self.finished:
            return
        yield from self.stream.main()
        self._commit()  # the main pass ends here: the Pillow pass resumes on its own
        self.in_fallback = True
        yield from self.stream.fallback()
        self.errors.update(self.stream.errors)
        self._commit()
        self.finished = True

    def add(self, rows: dict[str, np.ndarray]) -> None:
        """The rows computed for the batch just yielded (each array: one row per result)."""
        for key, value in rows.items():
            value = np.asarray(value)
            self.rows.setdefault(key, []).append(value)
            self.bytes += value.nbytes
        if not self.in_fallback and (self.pacer.due() or self.bytes >= self.budget):
            self._commit()

    def _commit(self) -> None:
        name = self.work.chunk_name(self.next_chunk)
        self.next_chunk += 1
        with self.work.write(name) as f:
            f.attrs["_position"] = self.offset + self.stream.position
            f.attrs["_fallback"] = self.in_fallback
            f["_dropped"] = np.asarray(sorted(self.stream.dropped), np.int64)
            if self.in_fallback:
                g = f.create_group("_errors")
                ids = sorted(self.stream.errors)
                g["image"] = np.asarray(ids, np.int64)
                write_strings(g, "reason", [self.stream.errors[i] for i in ids])
            for key, parts in self.rows.items():
                data = np.concatenate(parts)
                options = {}
                if len(data):  # rows chunked for per-image reads, maps compressed
                    rows = max(1, min(len(data), (1 << 20) // max(1, data[0].nbytes)))
                    options = dict(chunks=(rows,) + data.shape[1:])
                    if data.ndim > 2:
                        options.update(compression="gzip", shuffle=True)
                f.create_dataset(key, data=data, **options)
        self.rows, self.bytes = {}, 0
