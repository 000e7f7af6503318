"""The corpus of bad inputs (see README.md): each file or command line of cases.yaml gets its one line."""

import json
import re
from pathlib import Path

import pytest
import yaml

from loopformer.cli import main
from loopformer.config import load_config
from loopformer.data.sources import build_data
from loopformer.errors import ConfigError, DataError

HERE = Path(__file__).parent
CASES = yaml.safe_load((HERE / "cases.yaml").read_text())


def _id(case):
    return str(case.get("file") or " ".join(case["argv"])) + (f" [{case['issue']}]" if "issue" in case else "")


def one_line(message, case):
    assert "\n" not in message, message
    assert re.search(case["expect"], message), (case["expect"], message)


def test_every_file_has_a_case():
    named = {c["file"] for kind in ("config", "corpus") for c in CASES[kind]}
    files = {str(p.relative_to(HERE)) for folder in ("configs", "corpora") for p in (HERE / folder).iterdir()}
    assert files <= named, f"files without a case in cases.yaml: {sorted(files - named)}"


@pytest.mark.parametrize("case", CASES["config"], ids=_id)
def test_bad_config(case):
    with pytest.raises(ConfigError) as info:
        load_config(HERE / case["file"])
    one_line(str(info.value), case)


@pytest.mark.parametrize("case", CASES["corpus"], ids=_id)
def test_bad_corpus(case, tmp_path):
    cfg = load_config(None, ["data.task=text", f"data.paths={json.dumps([str(HERE / case['file'])])}",
                             "data.seq_len=16", f"run.dir={tmp_path}", *case.get("overrides", [])])
    if "ok" in case:
        source = build_data(cfg)
        next(source.train_iterator(2, 0))
        assert re.search(case["ok"], source.describe()), source.describe()
        return
    with pytest.raises(DataError) as info:
        next(build_data(cfg).train_iterator(2, 0))
    one_line(str(info.value), case)


@pytest.mark.parametrize("case", CASES["cli"], ids=_id)
def test_bad_command_line(case, run_dir, capsys):
    argv = case["argv"] if case.get("run") is False else [case["argv"][0], "--run", str(run_dir), *case["argv"][1:]]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    one_line(lines[0].removeprefix("error: "), case)
