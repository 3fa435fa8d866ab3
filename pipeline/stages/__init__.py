"""Stages: each module here with a `run(cfg, run_dir, stage_print)` function is a stage.

`KEYS` in a stage module names the config keys its results depend on (its
fingerprint); an empty `KEYS` means the stage always runs. Stages talk to each
other only through results.h5. A stage that reads another's results says so with
`needs(cfg)` (the runner refuses, before anything runs, a list that does not make
them first) or `reads(cfg)` (used when there); both are recorded, so recomputing one
of them marks this stage's results stale. `makes(cfg)` names the results a stage writes
besides its own (merge writes a scan).
"""

import pkgutil

STAGES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))

# keys any stage may read that decide how it runs, never what it finds: they are in no
# stage's KEYS (tests/test_stage_keys.py holds every stage to KEYS plus these)
RUN_KEYS = ("batch_size", "cache_dir", "checkpoint", "overwrite")
