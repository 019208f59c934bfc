"""examples/train_long_classifier.py: its task generator, and a smoke run at a tiny size.

The generator's expressions are checked against an independent evaluator (a stack machine over the
tokens); the smoke run trains both models for a few steps on short sequences, in a subprocess as a
user runs it, and checks that the loss falls and the CSV and PNG are written.
"""

from __future__ import annotations

import csv
import importlib.util
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch_nystrom")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_long_classifier.py"


def _load():
    spec = importlib.util.spec_from_file_location("train_long_classifier", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _evaluate(tokens, ops, close):
    """Value of a token sequence, by a stack machine (written independently of the generator)."""
    funcs = {"MAX": max, "MIN": min, "MED": lambda a: int(statistics.median(a)), "SM": lambda a: sum(a) % 10}
    stack = [[]]
    for t in tokens:
        if t in ops:
            stack.append([ops[t]])
        elif t == close:
            name, *args = stack.pop()
            stack[-1].append(funcs[name](args))
        else:
            stack[-1].append(t - 1)
    (value,) = stack[0]
    return value


def test_expressions_have_the_length_asked_and_their_value():
    ex = _load()
    rng = random.Random(7)
    for length in [1] + list(range(3, 80)) + [1000, 1999]:
        for max_args in (2, 3, 10):
            tokens, value = ex.expression(rng, length, max_args)
            assert len(tokens) == length
            assert _evaluate(tokens, ex.OPS, ex.CLOSE) == value
            assert 0 <= value <= 9
    tokens, _ = ex.expression(rng, 2000, 10)
    assert 3 <= ex.depth(tokens) <= 20  # bushy trees, LRA-like depth
    toks, pad, labels = ex.make_batch(rng, 5, 30, 90, 10)
    assert toks.shape[0] == 5 and toks.shape[1] <= 90 and labels.shape == (5,)
    assert (pad == (toks == ex.PAD)).all() and not pad[:, :30].any()


def test_training_smoke_run(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT), "--steps", "30", "--batch-size", "16", "--min-len", "30", "--max-len", "60",
           "--dim", "32", "--layers", "1", "--landmarks", "8", "--eval-size", "32", "--eval-every", "10",
           "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "nystrom+sdpa" in proc.stderr  # the tqdm bar
    with open(out / "train_long_classifier.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["attention"] for r in rows} == {"nystrom", "sdpa"}
    for attention in ("nystrom", "sdpa"):
        mine = [r for r in rows if r["attention"] == attention]
        assert [int(r["step"]) for r in mine] == [10, 20, 30]
        losses = [float(r["train_loss"]) for r in mine]
        assert losses[-1] < losses[0] - 0.05, f"{attention}: the loss did not fall: {losses}"
        for r in mine:
            assert 0.0 <= float(r["eval_accuracy"]) <= 1.0
            assert float(r["ms_per_step"]) > 0
    png = out / "train_long_classifier.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["--dim", "30", "--heads", "4"], "--dim must be a multiple of --heads"),
    (["--min-len", "50", "--max-len", "40"], "need 3 <= --min-len <= --max-len"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load().parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
