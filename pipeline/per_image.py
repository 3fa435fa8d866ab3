"""The loop every per-image stage shares (activations, cam, occlusion, ablation): stream
the chosen images in batches, commit the rows computed for each batch in chunks (a killed
run resumes after the last one, pipeline.chunks), record the unreadable images, then
assemble the chunks into the stage's part.

    with per_image_part(store, "cam", stage_print, cfg, table, spec, ids, compute, batch_size) as (f, errors):
        ...   # f: the stage's part, open for writing, its rows assembled

`compute(batch_ids, pixels)` returns the batch's rows ({dataset path: array, one row per
result}); `unreadable` ends the one-line error raised when the group `name` got no row at
all, "<name>: none of the <unreadable>" (None: the stage writes empty tables itself).
The part is `<name>.h5`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import numpy as np
from tqdm import tqdm

from pipeline.errors import PipelineError


@contextmanager
def per_image_part(store, name: str, stage_print: str, cfg, table, spec, ids: np.ndarray,
                   compute: Callable[[np.ndarray, object], dict], batch_size: int, unreadable: str | None = None):
    from pipeline.chunks import BOOKKEEPING, ChunkedStream

    ids = np.asarray(ids, np.int64)
    work = store.work(name, stage_print, cfg.overwrite, batch_size=int(batch_size))
    stream = ChunkedStream(work, table, spec, int(batch_size), ids, cfg.checkpoint)
    with tqdm(total=len(ids), initial=len(ids) - stream.remaining, desc=name, unit="img") as bar:
        for batch_ids, pixels in stream:
            stream.add(compute(batch_ids, pixels))
            bar.update(len(batch_ids))
        bar.update(len(ids) - bar.n)
    store.write_images(len(table), stream.errors, replace=False)
    with store.write(f"{name}.h5") as f:
        work.assemble(f, skip=BOOKKEEPING)
        if unreadable is not None and name not in f:
            raise PipelineError(f"{name}: none of the {unreadable}")
        yield f, stream.errors
