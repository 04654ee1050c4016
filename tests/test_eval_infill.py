"""Infilling tasks built from HumanEval: the holes, the verdicts of the tests, and the command end to end."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from unmask.cli import main
from unmask.eval.humaneval import load_problems
from unmask.eval.infill import canvas_length, first_lines, make_task, make_tasks, task_program
from unmask.eval.sandbox import Limits, run_programs
from unmask.loading import load


@pytest.fixture(scope="module")
def problems():
    return load_problems()


def test_holes_cut_the_solution_into_prefix_middle_and_suffix(problems) -> None:
    by_id = {p.task_id: p for p in problems}
    tasks = make_tasks(problems, seed=0)
    singles = [t for t in tasks if t.kind == "single-line"]
    multis = [t for t in tasks if t.kind == "multi-line"]
    assert len(singles) == 164 and 100 < len(multis) < 164  # some solutions are one line long
    for t in tasks:
        p = by_id[t.task_id]
        assert t.prefix + t.middle + t.suffix == p.prompt + p.canonical_solution
        assert t.prefix.startswith(p.prompt.rstrip("\n"))
        assert t.middle.startswith("\n") and t.middle.count("\n") == t.n_lines
        hidden = t.middle.split("\n")[1:]
        assert hidden[0].strip() and hidden[-1].strip()  # a hole starts and ends on code, not a blank line
        assert (t.n_lines == 1) == (t.kind == "single-line") and 1 <= t.n_lines <= 4
        assert t.suffix == "" or t.suffix.startswith("\n")


def test_holes_are_chosen_by_the_seed(problems) -> None:
    sample = problems[:20]
    assert make_tasks(sample, seed=0) == make_tasks(sample, seed=0)
    assert make_tasks(sample, seed=0) != make_tasks(sample, seed=1)


def test_the_true_middle_passes_and_wrong_middles_fail(problems) -> None:
    by_id = {p.task_id: p for p in problems}
    tasks = make_tasks(problems[::3], seed=0)
    truth = run_programs([task_program(t, by_id[t.task_id], t.middle) for t in tasks], Limits(), workers=2)
    assert [(t.task_id, t.kind) for t, r in zip(tasks, truth) if not r.passed] == []
    garbage = run_programs([task_program(t, by_id[t.task_id], "\n    )(") for t in tasks[:10]], Limits(), workers=2)
    assert not any(r.passed for r in garbage)
    # A plausible but wrong line: HumanEval/0 with its early `return True` turned into `return False`.
    first = problems[0]
    lines = first.canonical_solution.rstrip("\n").split("\n")
    index = next(i for i, line in enumerate(lines) if line.strip() == "return True")
    task = _task_at(first, index)
    assert task.middle.strip() == "return True"
    wrong = task.middle.replace("True", "False")
    right, bad = run_programs([task_program(task, first, task.middle), task_program(task, first, wrong)])
    assert right.passed and not bad.passed


def _task_at(problem, index: int):
    """The single-line task of ``problem`` whose hole is line ``index`` (found by trying seeds)."""
    for seed in range(1000):
        task = make_task(problem, "single-line", random.Random(seed))
        if task.first_line == index:
            return task
    raise AssertionError("no seed picks that line")


def test_canvas_is_one_and_a_half_times_the_true_length(tiny_tokenizer) -> None:
    middle = "\n    return a + b"
    n = len(tiny_tokenizer.encode(middle))
    assert canvas_length(tiny_tokenizer, middle) == math.ceil(1.5 * n)
    assert canvas_length(tiny_tokenizer, "") == 1


def test_prefix_only_continuations_keep_the_hidden_line_count() -> None:
    text = "\n    a = 1\n    b = 2\n    c = 3"
    assert first_lines(text, 1) == "\n    a = 1"
    assert first_lines(text, 2) == "\n    a = 1\n    b = 2"
    assert first_lines(text, 9) == text


def test_eval_infill_command(tiny_model_dir: Path, tiny_ar_model_dir: Path, tmp_path: Path, capsys) -> None:
    for model, mode in ((tiny_model_dir, "fill-in-the-middle"), (tiny_ar_model_dir, "prefix-only")):
        out = tmp_path / "infill.json"
        code = main(["eval", "infill", "--model", str(model), "--limit", "2", "--device", "cpu", "--json", str(out)])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "single-line" in captured.out and "multi-line" in captured.out
        record = json.loads(out.read_text())
        assert record["decoding"]["mode"] == mode
        assert record["summary"]["single-line"]["tasks"] == 2
        kinds = [r["kind"] for r in record["results"]]
        assert kinds.count("single-line") == 2 and len(kinds) == 2 + record["summary"]["multi-line"]["tasks"]
        tok = load(model, device="cpu").tokenizer
        assert all(r["canvas"] == canvas_length(tok, r["truth"]) for r in record["results"])
        if mode == "prefix-only":
            assert all(r["middle"].count("\n") <= r["lines"] for r in record["results"])


def test_tokens_per_step_paces_every_hole_alike(tiny_model_dir: Path) -> None:
    from unmask.decoding import GenerationConfig
    from unmask.eval.generation import fill

    loaded = load(tiny_model_dir, device="cpu")
    lengths = [3, 7, 12, 12, 20]
    prefixes = ["def f(x):\n    y = x"] * len(lengths)
    suffixes = ["\n    return y\n"] * len(lengths)
    config = GenerationConfig(stop_at_eos=False, block_size=None)
    for k in (1, 2, 4):
        out = fill(loaded, prefixes, suffixes, lengths, config, batch_size=2, tokens_per_step=k)
        # Each hole takes ceil(n / k) forward passes: the pace is k tokens per step whatever its length.
        assert out.row_steps == sum(math.ceil(n / k) for n in lengths)
        assert out.tokens == sum(lengths)
    fixed = fill(loaded, prefixes, suffixes, lengths, GenerationConfig(stop_at_eos=False, block_size=None, steps=4), batch_size=2)
    assert fixed.row_steps == sum(min(4, n) for n in lengths)
