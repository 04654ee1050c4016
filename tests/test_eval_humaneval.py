"""HumanEval: the shipped problems, program assembly, the sandbox verdicts, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unmask.cli import main
from unmask.decoding import GenerationConfig
from unmask.eval import humaneval
from unmask.eval.generation import complete, fit_prompt, fit_sides
from unmask.eval.humaneval import cut_at_stop, load_problems, model_prompt, program
from unmask.eval.sandbox import Limits, run_programs
from unmask.loading import load


def test_the_164_problems_come_from_the_installed_package() -> None:
    problems = load_problems()
    assert len(problems) == 164
    assert [p.task_id for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    assert all(f"def {p.entry_point}(" in p.prompt and "def check(candidate)" in p.test for p in problems)
    assert len(load_problems(limit=5)) == 5


def test_every_canonical_solution_passes_in_the_sandbox() -> None:
    problems = load_problems()
    results = run_programs([program(p, p.canonical_solution) for p in problems], Limits(), workers=2)
    failed = [(p.task_id, r.reason) for p, r in zip(problems, results) if not r.passed]
    assert failed == []


def test_wrong_solutions_fail() -> None:
    problems = load_problems()[::8]
    unimplemented = run_programs([program(p, "    raise NotImplementedError\n") for p in problems], Limits(), workers=2)
    assert not any(r.passed for r in unimplemented)
    first = load_problems(limit=1)[0]
    flipped = first.canonical_solution.replace("return True", "return None")
    assert flipped != first.canonical_solution
    assert run_programs([program(first, flipped)])[0].outcome == "failed"


def test_the_model_sees_the_prompt_without_its_final_newline_and_writes_it() -> None:
    problems = load_problems()
    for p in problems:
        prompt = model_prompt(p)
        assert p.prompt == prompt + "\n"
        assert program(p, "\n" + p.canonical_solution, prompt) == program(p, p.canonical_solution)


def test_completions_are_cut_at_the_first_stop_sequence() -> None:
    body = "\n    return a + b\n\ndef other():\n    pass\n"
    assert cut_at_stop(body) == "\n    return a + b\n"
    assert cut_at_stop("\n    x = 1\n    # inner comment stays\n    return x\n# top level\nprint(x)") == (
        "\n    x = 1\n    # inner comment stays\n    return x"
    )
    assert cut_at_stop("\n    return 1\nif __name__ == '__main__':\n    main()") == "\n    return 1"
    assert cut_at_stop("\n    return 1") == "\n    return 1"


def test_prompts_are_fitted_into_the_context() -> None:
    assert fit_prompt([1, 2, 3], 5) == ([1, 2, 3], False)
    assert fit_prompt([1, 2, 3, 4, 5, 6], 4) == ([3, 4, 5, 6], True)
    left, right, cut = fit_sides(list(range(10)), list(range(100, 110)), 8)
    assert cut and len(left) + len(right) == 8 and left == list(range(6, 10)) and right == list(range(100, 104))
    left, right, cut = fit_sides([1, 2], list(range(100, 110)), 8)
    assert (left, right) == ([1, 2], list(range(100, 106))) and cut


def test_batched_completions_match_one_at_a_time(tiny_model_dir: Path) -> None:
    loaded = load(tiny_model_dir, device="cpu")
    prompts = ["def add(a, b):", "class Point:\n    def __init__(self):", "for i in range(10):", "import os"]
    config = GenerationConfig(max_new_tokens=12, block_size=4, steps=6, seed=3, temperature=0.7)
    together = complete(loaded, prompts, config, batch_size=4)
    alone = complete(loaded, prompts, config, batch_size=1)
    assert together.texts == alone.texts and together.finish_reasons == alone.finish_reasons
    assert together.tokens == alone.tokens > 0
    assert together.mode == "diffusion" and together.nfe > 0


def test_eval_humaneval_command_writes_a_table_and_json(
    tiny_model_dir: Path, tiny_ar_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for model, mode in ((tiny_model_dir, "diffusion"), (tiny_ar_model_dir, "ar")):
        out = tmp_path / f"{mode}.json"
        code = main(["eval", "humaneval", "--model", str(model), "--limit", "3", "--max-new-tokens", "8",
                     "--steps", "4", "--device", "cpu", "--json", str(out)])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "HumanEval" in captured.out and "pass@1" in captured.out
        record = json.loads(out.read_text())
        assert record["problems"] == 3 and len(record["results"]) == 3
        assert record["decoding"]["mode"] == mode
        assert record["passed"] == sum(r["outcome"] == "passed" for r in record["results"])
        assert sum(record["outcomes"].values()) == 3
        assert [r["task_id"] for r in record["results"]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
        assert record["decoding"]["truncated_prompts"] == 3  # the tiny model's context is shorter than the prompts


def test_evaluate_reports_passes_consistently(tiny_model_dir: Path) -> None:
    loaded = load(tiny_model_dir, device="cpu")
    report = humaneval.evaluate(loaded, GenerationConfig(max_new_tokens=6, steps=3), limit=2, workers=2)
    assert report.data["pass_at_1"] == report.data["passed"] / 2
    assert report.rows[0][2] == 2
    assert all(r["completion"] == cut_at_stop(r["completion"]) for r in report.data["results"])
