"""README.md's benchmark tables are what tools/readme_tables.py makes from the committed
results files, so a number in the README always has a results file behind it."""
import copy
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "readme_tables.py"

if not TOOL.exists() or not (ROOT / "bench" / "results" / "latest.json").exists():
    pytest.skip("tools/ and bench/results/ are in the repository, not in the sdist",
                allow_module_level=True)

spec = importlib.util.spec_from_file_location("readme_tables", TOOL)
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)


def test_readme_tables_are_up_to_date():
    text = rt.README.read_text(encoding="utf-8")
    assert rt.render(text) == text, "run: python tools/readme_tables.py"
    assert rt.main(["--check"]) == 0


def test_every_summary_row_comes_from_the_results(tmp_path):
    doc = json.loads(rt.LATEST.read_text())
    block = rt.summary_block(doc)
    # change one median in a copy: the generated table changes with it
    changed = copy.deepcopy(doc)
    key = rt.SUMMARY_ROWS[0][1]
    row = next(r for r in changed["results"] if r["key"] == key)
    row["contenders"]["cdl"]["median_s"] = 0.123456
    assert "| 123 |" in rt.summary_block(changed)
    assert rt.summary_block(changed) != block
    # every labelled row is there, with a value for each contender
    for label, _ in rt.SUMMARY_ROWS:
        line = next(l for l in block.splitlines() if l.startswith(f"| {label} |"))
        assert len(line.split("|")) == 8 and "n/a" not in line


def test_missing_markers_are_an_error():
    with pytest.raises(SystemExit, match="no <!-- readme_tables:summary:begin -->"):
        rt.render("no markers here")


def test_readme_has_no_unsourced_claims():
    text = rt.README.read_text(encoding="utf-8")
    for phrase in ("issue notes", "467 GFLOP/s", "six full runs", "a quiet machine",
                   "about 6 minutes"):
        assert phrase not in text


def test_ms_format():
    assert [rt.ms(v) for v in (429.3, 96.03, 10.57, 1.3234, 0.07272, 0.009762)] == \
        ["429", "96", "10.6", "1.32", "0.0727", "0.00976"]
