"""`unmask data distill`: SFT prompts answered by an AR teacher's greedy bodies (unmask.train.distill)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unmask.decoding.ar import ar_generate
from unmask.decoding.config import GenerationConfig
from unmask.decoding.healing import completion_text, heal
from unmask.errors import UnmaskError
from unmask.loading import load
from unmask.train.distill import distill, function_body, select_prompts
from unmask.train.sft import read_records

TEACHER = "coder-nano-cpu-ar"  # the shipped tiny AR coder: it writes code-shaped lines, so some bodies end
HEADERS = [
    'def add(a, b):\n    """Return the sum of a and b."""\n',
    'def is_even(n):\n    """True when n is even."""\n',
    'def reverse(items):\n    """The items in reverse order."""\n',
    'def count_words(text):\n    """How many words the text has."""\n',
    'def clamp(x, low, high):\n    """x limited to [low, high]."""\n',
    'def mean(values):\n    """The arithmetic mean of a list of numbers."""\n',
    'def first_line(path):\n    """The first line of the file at path."""\n',
]


@pytest.fixture(scope="module")
def teacher():
    return load(TEACHER)


@pytest.fixture()
def pairs(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"prompt": h, "completion": "    pass  # the original answer\n"}) for h in HEADERS]
    lines.insert(3, json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_body_ends_at_the_first_line_that_is_not_indented() -> None:
    text = "    x = 1\n\n    if x:\n        return x\n\ndef other():\n    pass\n"
    assert function_body(text) == ("    x = 1\n\n    if x:\n        return x\n", True)
    assert function_body("    return 1\n    ") == ("    return 1\n", False)
    assert function_body("\n\n") == ("", False)
    assert function_body("print(1)\n") == ("", True)


def test_answers_are_the_teachers_one_at_a_time_greedy_bodies(tmp_path: Path, pairs: Path, teacher) -> None:
    """Batched fast-path answers equal the reference AR decoder's, prompt by prompt, token healing included."""
    out = tmp_path / "distilled.jsonl"
    result = distill(pairs, TEACHER, out, max_new_tokens=24, batch_size=3, load=lambda _: teacher)
    prompts, skipped = select_prompts(pairs, None)
    assert skipped["chat_record"] == 1 and sorted(prompts) == sorted(HEADERS)
    expected = []
    for prompt in prompts:  # the SHA-256 order the command uses
        healed = heal(teacher.tokenizer, teacher.tokenizer.encode(prompt))
        ids = ar_generate(teacher.model, [healed.ids], GenerationConfig(max_new_tokens=24), heal=[healed.heal]).sequences[0]
        body, ended = function_body(completion_text(teacher.tokenizer, ids, healed.heal))
        if body and (ended or len(ids) < 24):
            expected.append({"prompt": prompt, "completion": body})
    written = [record for _, record in read_records(out)]
    assert written == expected
    assert result.counts["written"] == len(expected) >= 1
    assert result.counts["written"] + result.counts["no_end"] + result.counts["empty"] == len(HEADERS) == result.done


def test_an_interrupted_run_resumes_to_the_same_file(tmp_path: Path, pairs: Path, teacher) -> None:
    whole = tmp_path / "whole.jsonl"
    distill(pairs, TEACHER, whole, max_new_tokens=16, batch_size=2, load=lambda _: teacher)

    def stop_after_two_batches(done: int, total: int) -> None:
        if done == 4:
            raise KeyboardInterrupt

    part = tmp_path / "part.jsonl"
    with pytest.raises(KeyboardInterrupt):
        distill(pairs, TEACHER, part, max_new_tokens=16, batch_size=2, load=lambda _: teacher, on_batch=stop_after_two_batches)
    with part.open("ab") as f:  # a crash between writing answers and recording them: the tail is dropped on resume
        f.write(b'{"prompt": "half a line')
    loads = []
    resumed = distill(pairs, TEACHER, part, max_new_tokens=16, batch_size=2, load=lambda _: loads.append(1) or teacher)
    assert part.read_bytes() == whole.read_bytes()
    assert resumed.done == len(HEADERS) and loads == [1]
    again = distill(pairs, TEACHER, part, max_new_tokens=16, batch_size=2, load=lambda _: loads.append(1) or teacher)
    assert again.done == len(HEADERS) and loads == [1]  # finished: the teacher is not even loaded
    with pytest.raises(UnmaskError, match="other pairs or settings"):
        distill(pairs, TEACHER, part, max_new_tokens=17, batch_size=2, load=lambda _: teacher)


def test_prompts_from_held_out_files_are_never_answered(tmp_path: Path, pairs: Path, teacher) -> None:
    held = tmp_path / "held_out.py"  # the function, as a method: lines match once stripped
    held.write_text('class Maths:\n    def add(a, b):\n        """Return the sum of a and b."""\n        return a + b\n')
    same_signature = tmp_path / "other.py"  # a common signature alone does not make a prompt held out
    same_signature.write_text("def is_even(n):\n    return n % 2 == 0\n")
    out = tmp_path / "distilled.jsonl"
    result = distill(pairs, TEACHER, out, max_new_tokens=16, batch_size=4, exclude=[held, same_signature], load=lambda _: teacher)
    assert result.counts["held_out"] == 1 and result.done == len(HEADERS) - 1
    assert all(not record["prompt"].startswith("def add(") for _, record in read_records(out))


def test_bad_inputs_are_one_line_errors(tmp_path: Path, pairs: Path) -> None:
    with pytest.raises(UnmaskError, match="not found"):
        distill(tmp_path / "missing.jsonl", TEACHER, tmp_path / "o.jsonl")
    (tmp_path / "taken.jsonl").write_text("{}\n")
    with pytest.raises(UnmaskError, match="not a resumable"):
        distill(pairs, TEACHER, tmp_path / "taken.jsonl")
    with pytest.raises(UnmaskError, match="at least 1"):
        distill(pairs, TEACHER, tmp_path / "o.jsonl", limit=0)
    with pytest.raises(UnmaskError, match="AR"):
        distill(pairs, "coder-nano-cpu", tmp_path / "o.jsonl", max_new_tokens=4)
