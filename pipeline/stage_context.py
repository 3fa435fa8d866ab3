"""What the runner hands a stage's `run(ctx)`: its declaration (pipeline.stage_spec), the
config, the run directory, the stage's fingerprint, its store, its work folder, the
dataset's images, and the model bundle, loaded on first use and shared by the stages of
one run.

Sharing is safe because every stage of a run reads the same config, so the same model;
a stage that changes weights puts them back (pipeline.randomization). The context also
holds the stage to its declaration: only a stage whose keys name `model` gets the model,
only the results it declares (needs or reads) can be asked for, and its work folder
is resumed only with the settings its `resume` names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pipeline.stage_spec import Stage
from pipeline.store import Store, WorkDir

logger = logging.getLogger(__name__)


class Models:
    """The run's model bundle: loaded by the first stage that asks, kept for the others."""

    def __init__(self, cfg):
        self._cfg = cfg
        self._bundle = None
        self.loads = 0  # how many times this run loaded the model (the log says it at the end)

    def bundle(self):
        if self._bundle is None:
            from pipeline.models.sources import load_model

            self._bundle = load_model(self._cfg.model, self._cfg.cache_dir)
            self.loads += 1
        return self._bundle

    def forget(self) -> None:
        """Load again on the next use: a train stage may have written the snapshot the model names."""
        self._bundle = None


@dataclass
class StageContext:
    stage: str
    spec: Stage  # the stage's declaration
    cfg: Any
    run_dir: Path
    stage_print: str = ""  # fingerprint of the declared keys ("" for a stage that always runs)
    depends_on: tuple[str, ...] = ()  # the stages whose results it reads (spec.depends_on(cfg))
    models: Models | None = field(default=None, repr=False)

    @cached_property
    def store(self) -> Store:
        return Store(self.run_dir)

    @cached_property
    def images(self):
        """The dataset's image table (pipeline.datasets.list_images), listed once for the stage."""
        from pipeline.datasets import list_images

        return list_images(self.cfg.dataset)

    @property
    def bundle(self):
        """The run's ModelBundle (pipeline.models.sources), shared with the other stages."""
        if "model" not in self.spec.keys:  # its results would not change with the model: a bug
            raise RuntimeError(f"stage {self.stage} uses the model but its declared keys do not name model")
        if self.models is None:
            self.models = Models(self.cfg)
        return self.models.bundle()

    def holds(self, stage: str) -> bool:
        """Whether the store holds the results of `stage`, which this stage reads when there."""
        if stage not in self.depends_on:  # undeclared, a rerun of `stage` would not mark this one stale
            raise RuntimeError(f"stage {self.stage} reads {stage} results but its declaration does not name {stage}")
        return stage in self.store.stages_done()

    def work(self) -> WorkDir:
        """The stage's work folder for this config (pipeline.store.Store.work): its chunks
        resume only with the settings the declaration's `resume` gives for this config."""
        return self.store.work(self.stage, self.stage_print, self.cfg.overwrite, **self.spec.resume_settings(self.cfg))

    @property
    def part(self) -> Path:
        """The stage's part file in the store (its declared `part`)."""
        return self.store.parts / self.spec.part
