"""Stages: each module here with a `run(ctx)` function is a stage. The runner builds `ctx`
(pipeline.stage_context.StageContext): the config, the run directory, the stage's
fingerprint, its store, and the run's model bundle, loaded once and shared by the stages.

`KEYS` in a stage module names the config keys its results depend on (its
fingerprint); an empty `KEYS` means the stage always runs. Stages talk to each
other only through results.h5. A stage that reads another's results says so with
`needs(cfg)` (the runner refuses, before anything runs, a list that does not make
them first) or `reads(cfg)` (used when there); both are recorded, so recomputing one
of them marks this stage's results stale; `ctx.holds(stage)` tells whether a result it
`reads` is there. `makes(cfg)` names the results a stage writes besides its own (merge
writes a scan).
"""

import pkgutil

STAGES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))

# keys any stage may read that decide how it runs, never what it finds: they are in no
# stage's KEYS (tests/test_stage_keys.py holds every stage to KEYS plus these)
RUN_KEYS = ("batch_size", "cache_dir", "checkpoint", "overwrite")
