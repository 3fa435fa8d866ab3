"""A stage's declaration: one frozen value, `STAGE` in each stage module, that says what the
stage's results depend on and which other results it reads. The runner alone interprets
it (pipeline.runner): it fingerprints the keys, refuses a stage list that does not make
what a stage needs first, records what a stage depends on, and hands the stage a context
(pipeline.stage_context) that holds it to the declaration.

Fields that vary with the config (e.g. cam needs the scan only when it draws the top
images of channels) are functions of the config; the others are plain tuples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Union

Names = Union[tuple[str, ...], Callable[[Any], Iterable[str]]]


def _names(value: Names, cfg) -> tuple[str, ...]:
    return tuple(value(cfg)) if callable(value) else tuple(value)


@dataclass(frozen=True)
class Stage:
    # the config keys whose values decide the stage's results (its fingerprint); () means
    # the stage always runs (it reads only results.h5 and redraws what changed)
    keys: tuple[str, ...] = ()
    # its part file in parts/ (its results); None for a stage that writes none of its own
    part: str | None = None
    # stages whose results it must find: the runner refuses, before anything runs, a list
    # that does not make them first
    needs: Names = ()
    # stages whose results it uses when the store holds them (ctx.holds tells)
    reads: Names = ()
    # results it writes besides its own (merge writes a scan), for the stages after it
    makes: Names = ()
    # the settings of unfinished work that a resume must run with (e.g. batch_size, which
    # decides where the chunks end): config -> {name: value}, kept beside the chunks
    resume: Callable[[Any], dict] | None = None

    def needed(self, cfg) -> tuple[str, ...]:
        """The stages whose results it must find with this config: its `needs`, and train
        when the model is this run's own snapshot."""
        found = set(_names(self.needs, cfg))
        if "model" in self.keys and cfg.model.kind == "snapshot" and cfg.model.run_dir is None:
            found.add("train")  # the network trained in this very run
        return tuple(sorted(found))

    def depends_on(self, cfg) -> tuple[str, ...]:
        """The stages whose results it reads with this config: recomputing one of them makes
        this stage's results stale."""
        return tuple(sorted(set(self.needed(cfg)) | set(_names(self.reads, cfg))))

    def made(self, cfg) -> tuple[str, ...]:
        return _names(self.makes, cfg)

    def resume_settings(self, cfg) -> dict:
        return dict(self.resume(cfg)) if self.resume is not None else {}
