"""`filters` stage: convolution weights and filter patterns (activation maximisation).

Needs only the model (no scan). Writes, in results.h5:

    filters/kernel_table/    every convolution kernel of the model: layer, kind, variable, shape
    filters/<conv>/weights   kernels (kh, kw, in, out) as Keras holds them, bias, ...
    filters/<layer>/patterns (n, H, W, 3) uint8 at the model's input size, value, channels, ...

and renders, from results.h5 only, sheets/filters/*.png and the toolbox files
toolbox/regularized_opt/<layer>/ (pipeline.render.toolbox, the layout the export writes).
Patterns are written a block of channels at a time; a killed run resumes with the
channels that are missing.
"""

from __future__ import annotations

import logging

import numpy as np
from tqdm import tqdm

from pipeline import filter_jobs, kernels
from pipeline.render.filters import SHEETS_DIR, kernel_table_text, render_filter_sheets
from pipeline.render.toolbox import write_regularized_opt
from pipeline.stage_spec import Stage

logger = logging.getLogger(__name__)

# a pattern depends on its (seed, channel) only, not on the block it is computed in: a resume
# matches nothing but the config
STAGE = Stage(keys=("model", "layers", "filters"), part="filters.h5")

BLOCK_BATCHES = 8  # optimisation batches per chunk file (a killed run resumes after the last one)
TOOLBOX_DIR = "toolbox"


def run(ctx) -> None:
    from pipeline.patterns import filter_patterns

    cfg, store, run_dir = ctx.cfg, ctx.store, ctx.run_dir
    fc = cfg.filters
    recipe = filter_jobs.recipe(fc, fc.objective)
    bundle = ctx.bundle
    model, spec = bundle.model, bundle.preprocessing
    jobs = filter_jobs.jobs(cfg, bundle)
    table = kernels.conv_kernels(model)
    logger.info("convolution kernels of %s:\n%s", bundle.name, kernel_table_text(table))
    weight_layers = kernels.weight_layers(fc.weights, model, table, [j.layer for j in jobs])

    store.ensure_run(cfg, bundle)
    work = ctx.work()
    block = BLOCK_BATCHES * int(fc.batch_size)
    blocks = [(job, np.arange(start, min(start + block, len(job.targets))))
              for job in jobs for start in range(0, len(job.targets), block)]
    done = set(work.chunks())
    todo = [(n, job, rows) for n, (job, rows) in enumerate(blocks) if work.chunk_name(n) not in done]
    total = sum(len(rows) for _, _, rows in todo) * int(fc.restarts)
    work.resuming(len(blocks) - len(todo), len(blocks), "blocks of channels")
    logger.info("filter patterns: %d image(s) over %d layer(s), %s, %d steps", total, len(jobs),
                recipe.method, recipe.steps)
    with tqdm(total=total // int(fc.restarts), desc="patterns", unit="ch") as bar:
        for number, job, rows in todo:
            bar.set_postfix_str(job.layer)
            result = filter_patterns(model, spec, job.layer, job.targets[rows], objective=fc.objective,
                                     recipe=recipe, repeats=int(fc.restarts), batch=int(fc.batch_size),
                                     head=job.head, progress=bar)
            with work.write(work.chunk_name(number)) as f:
                filter_jobs.write_block(f, job, rows, result, fc.objective)

    outdone = filter_jobs.outdo_rivals(work, blocks, bundle) if fc.rivals and fc.objective == "channel" else {}

    with store.write(ctx.spec.part) as f:
        work.assemble(f)
        for key, (images, values, started_from) in outdone.items():
            g = f[f"filters/{key}"]
            for name, data in (("patterns", images), ("value", values)):
                del g[name]  # a virtual dataset over the chunks, which stay as they were
            g.create_dataset("patterns", data=images, chunks=(1,) + images.shape[1:], compression="gzip",
                             shuffle=True)
            g["value"] = values
            g["started_from"] = started_from
        root = f.require_group("filters")
        root.attrs.update(objective=fc.objective, method=recipe.method, steps=recipe.steps,
                          size=recipe.size or min(spec.size), lr=recipe.learning_rate, seed=recipe.seed,
                          seeds=int(fc.restarts), transforms=recipe.transforms and recipe.method == "fourier",
                          upscale=recipe.upscale, normalize=spec.normalize)
        kernels.write_kernel_table(root, table)
        kernels.write_weights(f, model, weight_layers)
        kernels.write_conv_links(f, model, jobs, weight_layers)
    part = ctx.part
    render_filter_sheets(part, run_dir.joinpath(*SHEETS_DIR), bgr=spec.normalize == "caffe")
    if fc.toolbox:
        write_regularized_opt(part, run_dir / TOOLBOX_DIR)
