"""tools/compare_notebooks.py, the tolerance comparison `make test` runs off x86-64: what it
accepts and what it reports."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
compare_notebooks = pytest.importorskip("compare_notebooks")


def diffs(stored, fresh, rtol=0.05):
    return list(compare_notebooks.compare_text(stored, fresh, rtol))


def test_numbers_within_tolerance_pass_and_beyond_it_are_reported():
    assert diffs("SQNR 10.2346 dB, acc 96.22 %", "SQNR 10.2042 dB, acc 95.80 %") == []
    (kind, detail), = diffs("SQNR 10.2346 dB", "SQNR 9.1 dB")
    assert kind == "number" and "stored 10.2346, fresh 9.1" in detail and "11.09%" in detail


def test_last_printed_digit_is_the_floor_of_the_tolerance():
    assert diffs("3 of 12 layers", "3 of 12 layers") == []
    assert diffs("0.0012", "0.0013") == []            # one unit of the last digit
    assert diffs("0.0012", "0.0015") != []
    assert diffs("1.5e-03", "1.6e-03") == []
    assert diffs("7", "9") != []


def test_changed_words_fail_whatever_the_numbers():
    (kind, _), = diffs("best: mse 4.1", "best: kl 4.1")
    assert kind == "text"
    assert diffs("a | 1.0 |\nb | 2.0 |", "a | 1.0 |") != []


def test_sanitize_rules_come_from_nbval_sanitize_cfg():
    rules = compare_notebooks.sanitize_rules()
    text = "object at 0x7f3a2b1c4d50, wall-clock 3.2 s"
    for regex, replace in rules:
        text = regex.sub(replace, text)
    assert text == "object at 0xADDR, wall-clock N s"
