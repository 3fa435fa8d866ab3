"""Renamed config keys: the old name is refused with one line naming the new one, on the
command line (before Hydra) and in a composed config; the new names are the schema's."""

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from pipeline.config import RENAMED, Config
from pipeline.errors import PipelineError
from pipeline.validate import check_config, renamed_override
from test_pipeline import compose_cfg


def test_an_old_name_on_the_command_line_names_the_new_one():
    for arg in ("filters.batch=4", "+filters.batch=4", "++invariance.correspondence_class=2", "~train.channels",
                "filters.seeds=1,2"):
        old = re.sub(r"^[+~]*", "", arg).split("=")[0]
        assert renamed_override(["-m", "stages=[filters]", arg]) == \
            f"{old} is now {RENAMED[old]}: write {RENAMED[old]}=... instead"
    assert renamed_override(["filters.batch_size=4", "invariance.fill_mode=wrap", "--cfg", "job"]) is None


def test_an_old_name_in_a_composed_config_names_the_new_one():
    cfg = compose_cfg(["+invariance.fill=wrap"])
    with pytest.raises(PipelineError, match=r"^invariance.fill is now invariance.fill_mode: write "):
        check_config(cfg)
    check_config(compose_cfg(["invariance.fill_mode=wrap", "correspondence.label=3", "filters.restarts=2"]))


def test_every_new_name_is_in_the_schema_and_no_old_one_is():
    schema = OmegaConf.structured(Config)
    for old, new in RENAMED.items():
        assert OmegaConf.select(schema, old, default="absent") == "absent", old
        assert OmegaConf.select(schema, new, default="absent") != "absent", new


def test_the_documents_use_only_the_new_names():
    root = Path(ROOT)
    texts = [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "conf" / "config.yaml"]
    for old in RENAMED:
        # an old name only where the text says what the new one was
        pattern = rf"(?<![\w.])(?<!was[ \n]`){re.escape(old)}(?![\w])"
        found = [p.name for p in texts if re.search(pattern, p.read_text())]
        assert not found, f"{old} (now {RENAMED[old]}) is still in {found}"
