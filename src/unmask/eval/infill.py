"""Infilling built from HumanEval's canonical solutions: hide lines, let the model write them back.

For every problem one line of the canonical solution (single-line task) and one span of 2-4
lines (multi-line task) are chosen by a seeded generator. The model sees the prompt and the
solution's lines before the hole as prefix, the lines after it as suffix, and writes the middle;
the problem's tests decide. The model is told nothing about the middle except a canvas of
``ceil(1.5 x`` the true middle's token count``)`` masks, which it may end early with EOS.

Cuts fall just before a newline: the middle is ``"\\n" + hidden lines`` and the suffix starts
with the newline that ends them, so every piece starts as text does in training (the project's
tokenizers join a newline with the next line's indentation).

Causal and block-causal models cannot see a suffix. They continue the prefix alone with the same
token budget, and their middle is cut after as many lines as were hidden ("prefix-only").
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

from unmask.decoding import GenerationConfig
from unmask.eval.generation import fill
from unmask.eval.humaneval import Problem, load_problems, program
from unmask.eval.report import Report, environment, model_facts, progress_bar
from unmask.eval.sandbox import Limits, isolation, run_programs
from unmask.loading import LoadedModel
from unmask.tokenizer import Tokenizer

KINDS = ("single-line", "multi-line")
CANVAS_SCALE = 1.5  # canvas length / true middle length


@dataclass
class InfillTask:
    """One hole in one canonical solution."""

    task_id: str  # HumanEval task id
    kind: str  # "single-line" | "multi-line"
    first_line: int  # 0-based index of the first hidden line within the canonical solution
    n_lines: int  # hidden lines
    prefix: str  # prompt + solution up to (not including) the newline before the hole
    middle: str  # the true middle: "\n" + hidden lines joined by "\n"
    suffix: str  # from the newline that ends the hole to the end of the solution


def make_task(problem: Problem, kind: str, rng: random.Random) -> InfillTask | None:
    """A hole of one line (single-line) or 2-4 lines (multi-line), or None if the solution is too short."""
    lines = problem.canonical_solution.rstrip("\n").split("\n")
    code = [i for i, line in enumerate(lines) if line.strip()]
    if kind == "single-line":
        if not code:
            return None
        first, n = rng.choice(code), 1
    else:
        starts = [i for i in code if any(lines[j].strip() for j in range(i + 1, min(i + 4, len(lines))))]
        if not starts:
            return None
        first = rng.choice(starts)
        n = rng.choice([k for k in range(2, min(4, len(lines) - first) + 1) if lines[first + k - 1].strip()])
    text = problem.prompt + problem.canonical_solution
    offset = len(problem.prompt)
    for line in lines[:first]:
        offset += len(line) + 1
    start = offset - 1  # the newline that ends the line before the hole (the prompt's last newline for line 0)
    end = offset + sum(len(line) + 1 for line in lines[first : first + n]) - 1
    return InfillTask(problem.task_id, kind, first, n, text[:start], text[start:end], text[end:])


def make_tasks(problems: list[Problem], seed: int = 0) -> list[InfillTask]:
    """Single-line then multi-line tasks, one of each per problem where the solution allows."""
    tasks = []
    for kind in KINDS:
        for problem in problems:
            task = make_task(problem, kind, random.Random(f"{seed}:{problem.task_id}:{kind}"))
            if task is not None:
                tasks.append(task)
    return tasks


def task_program(task: InfillTask, problem: Problem, middle: str) -> str:
    """The program with ``middle`` in the hole (prefix + middle + suffix, then the tests)."""
    solution = (task.prefix + middle + task.suffix)[len(problem.prompt) :]
    return program(problem, solution)


def canvas_length(tokenizer: Tokenizer, middle: str, scale: float = CANVAS_SCALE) -> int:
    return max(1, math.ceil(scale * len(tokenizer.encode(middle))))


def first_lines(text: str, n: int) -> str:
    """A prefix-only continuation cut after ``n`` lines (it starts with the newline before line 1)."""
    parts = text.split("\n")
    return "\n".join(parts[: n + 1])


def evaluate(
    loaded: LoadedModel,
    config: GenerationConfig,
    *,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    workers: int = 2,
    limits: Limits | None = None,
    tokens_per_step: int | None = None,
    token_healing: bool = True,
) -> Report:
    """Pass rates for single-line and multi-line infilling on the first ``limit`` problems.

    ``tokens_per_step``: each hole's canvas gets ``ceil(length / tokens_per_step)`` steps
    (holes differ in length, so a fixed ``config.steps`` would decode them at different paces).
    """
    problems = load_problems(limit)
    by_id = {p.task_id: p for p in problems}
    tasks = make_tasks(problems, seed)
    tok = loaded.tokenizer
    lengths = [canvas_length(tok, t.middle) for t in tasks]
    with progress_bar("infilling", len(tasks)) as advance:
        outputs = fill(
            loaded, [t.prefix for t in tasks], [t.suffix for t in tasks], lengths, config, batch_size, advance,
            tokens_per_step, token_healing,
        )
    middles = outputs.texts
    if outputs.mode == "prefix-only":
        middles = [first_lines(m, t.n_lines) for m, t in zip(middles, tasks)]
    limits = limits or Limits()
    sources = [task_program(t, by_id[t.task_id], m) for t, m in zip(tasks, middles)]
    with progress_bar("testing", len(sources)) as advance:
        results = run_programs(sources, limits, workers, lambda i, r: advance(1))
    stats = outputs.stats()
    rows, summary = [], {}
    for kind in KINDS:
        picked = [r for t, r in zip(tasks, results) if t.kind == kind]
        exact = sum(m == t.middle for t, m in zip(tasks, middles) if t.kind == kind)
        passed = sum(r.passed for r in picked)
        rate = passed / len(picked) if picked else 0.0
        summary[kind] = {"tasks": len(picked), "passed": passed, "pass_rate": rate, "exact_match": exact}
        rows.append([kind, stats["mode"], len(picked), passed, rate, exact])
    notes = [
        f"{len(problems)} problems; holes chosen with seed {seed}; canvas = ceil({CANVAS_SCALE} x true middle tokens), "
        "the model may end the middle early with EOS.",
    ]
    if outputs.mode == "prefix-only":
        notes.append("this model cannot see a suffix: it continued the prefix and its middle was cut after the hidden line count.")
    if outputs.truncated:
        notes.append(f"{outputs.truncated} tasks lost context (prefix from the left, suffix from the right) to fit the model.")
    data = {
        "metric": "infill pass rate",
        "model": model_facts(loaded),
        "generation": dataclasses.asdict(config),
        "token_healing": token_healing,
        "canvas_scale": CANVAS_SCALE,
        "seed": seed,
        "problems": len(problems),
        "summary": summary,
        "decoding": stats,
        "sandbox": {"limits": dataclasses.asdict(limits), **isolation().describe()},
        "environment": environment(loaded),
        "results": [
            {"task_id": t.task_id, "kind": t.kind, "first_line": t.first_line, "lines": t.n_lines,
             "canvas": n, "outcome": r.outcome, "reason": r.reason, "middle": m, "truth": t.middle}
            for t, r, m, n in zip(tasks, results, middles, lengths)
        ],
    }
    columns = ["task", "decoding", "tasks", "passed", "pass rate", "exact match"]
    return Report(f"HumanEval infilling · {loaded.path.name}", columns, rows, notes, data)
