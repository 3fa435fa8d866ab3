"""Stages: each module here is a stage, with a `run(ctx)` function and a declaration
`STAGE = Stage(...)` (pipeline.stage_spec): the config keys its results depend on (its
fingerprint; none means it always runs), its part file, the stages whose results it needs
(the runner refuses, before anything runs, a list that does not make them first) or reads
when there, what it writes besides its own results (merge writes a scan), and the settings
a resumed run must match. Only the runner reads the declaration: it skips a stage whose
results are there for this config, records what the stage depends on (recomputing one of
those marks its results stale), and builds `ctx` (pipeline.stage_context): the config,
the run directory, the store, the work folder, the dataset's images, and the run's model
bundle, loaded once and shared by the stages, all held to the declaration. Stages talk to each other only
through results.h5.
"""

import pkgutil

STAGES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))

# keys any stage may read that decide how it runs, never what it finds: they are in no
# stage's declared keys (tests/test_stage_keys.py holds every stage to its keys plus these)
RUN_KEYS = ("batch_size", "cache_dir", "checkpoint", "overwrite")
