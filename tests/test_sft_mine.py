"""Mining SFT pairs from Python source: what is kept, what is filtered, and that HumanEval never gets in."""

from __future__ import annotations

import ast
import json
import textwrap
from pathlib import Path

import pytest

from unmask.cli import main as cli_main
from unmask.eval.humaneval import load_problems
from unmask.train.mine import HumanEvalGuard, MineOptions, mine_pairs
from unmask.train.sft import build_sft, open_sft

GOOD = '''
import math


def area(radius):
    """Return the area of a circle of the given radius."""
    squared = radius * radius
    return math.pi * squared


class Stack:
    def push(self, item):
        """Put an item on top of the stack and return its new size."""
        self.items.append(item)
        return len(self.items)

    def _nested_owner(self):
        """A method whose nested helper is not mined on its own."""
        def helper(x):
            """Double the number x and add one to it."""
            y = x * 2
            return y + 1
        return helper(3)


# Join the words with single spaces and end with a full stop.
def sentence(words):
    text = " ".join(words)
    return text + "."


def short(x):
    """Too short."""
    y = x
    return y


def stub(x):
    """An abstract hook that subclasses must fill in."""
    raise NotImplementedError


def test_something():
    """Checks that area works for the unit circle."""
    value = area(1)
    assert value > 3
'''


def write_tree(root: Path) -> Path:
    """A small source tree: good functions, a copy, tests, a broken file and HumanEval look-alikes."""
    problem = load_problems(limit=3)[2]  # one real task, to plant its name and its docstring
    files = {
        "pkg/geometry.py": GOOD,
        "pkg/vendored/geometry_copy.py": GOOD,  # the same functions again: duplicates
        "pkg/broken.py": "def nope(:\n    pass\n",
        "pkg/latin1.py": b"# \xe9\ndef f():\n    return 1\n",
        "pkg/tests/test_geometry.py": GOOD.replace("area", "area2"),
        "pkg/human_eval/solutions.py": GOOD.replace("area", "area3"),
        "pkg/mentions.py": "# adapted from the HumanEval benchmark\n" + GOOD.replace("area", "area4"),
        "pkg/lookalike.py": textwrap.dedent(f'''
            def {problem.entry_point}(values):
                """Some unrelated docstring that is long enough to keep."""
                total = 0
                return total


            def renamed(values):
                """{problem.prompt.split('"""')[1].strip().splitlines()[0]}"""
                total = 0
                return total


            def solved(number: float) -> float:
                """A docstring of our own about a number's fractional part."""
            {textwrap.indent(problem.canonical_solution.strip(), "    ")}
            '''),
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return root


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_miner_on_a_small_tree(tmp_path):
    root = write_tree(tmp_path / "src")
    result = mine_pairs([str(root)], tmp_path / "pairs.jsonl")
    records = read_jsonl(tmp_path / "pairs.jsonl")
    assert result.pairs == len(records) == 3
    by_name = {ast.parse(r["prompt"] + "    pass\n").body[0].name: r for r in records}
    assert set(by_name) == {"area", "push", "_nested_owner"}
    area = by_name["area"]
    assert area["prompt"] == 'def area(radius):\n    """Return the area of a circle of the given radius."""\n'
    assert area["completion"] == "    squared = radius * radius\n    return math.pi * squared\n"
    assert area["source"].endswith("geometry.py:5")
    push = by_name["push"]  # a method, dedented to a standalone def
    assert push["prompt"].startswith("def push(self, item):\n") and push["completion"].startswith("    self.items.append")
    for r in records:  # every pair is valid Python when joined, and the answer never repeats the docstring
        ast.parse(r["prompt"] + r["completion"])
        assert '"""' not in r["completion"] or "def helper" in r["completion"]
    c = result.counts
    assert c["files_found"] == 8 and c["files_parsed"] == 3 and c["unparsable_file"] == 1 and c["unreadable_file"] == 1
    assert c["test_file"] == 1 and c["humaneval_file"] == 2
    assert c["functions_duplicate"] == 3 and c["functions_test_function"] == 2 and c["functions_trivial_body"] == 2
    assert c["functions_no_docstring"] == 2 and c["functions_request_length"] == 2
    assert c["functions_humaneval_name"] == 1 and c["functions_humaneval_docstring"] == 1 and c["functions_humaneval_solution"] == 1


def test_no_pair_comes_from_humaneval(tmp_path):
    """Every HumanEval problem written out as a source file: nothing of it is mined."""
    root = tmp_path / "src"
    root.mkdir()
    for k, problem in enumerate(load_problems()):
        (root / f"task_{k}.py").write_text(problem.prompt + problem.canonical_solution)
        renamed = problem.prompt.replace(f"def {problem.entry_point}(", f"def mined_{k}(")
        (root / f"renamed_{k}.py").write_text(renamed + problem.canonical_solution)
    result = mine_pairs([str(root)], tmp_path / "pairs.jsonl")
    c = result.counts
    assert result.pairs == 0 and c["files_parsed"] == 2 * 164
    assert c["functions_humaneval_name"] >= 164  # the tasks as shipped (some define helpers too)
    assert c["functions_humaneval_docstring"] + c["functions_humaneval_solution"] >= 164  # renamed: by docstring or body
    guard = HumanEvalGuard.load()
    assert guard.names == {p.entry_point for p in load_problems()} and len(guard.doc_lines) > 150


def test_chat_style_and_the_comment_option_make_sft_examples(tmp_path, tiny_tokenizer):
    root = write_tree(tmp_path / "src")
    mine_pairs([str(root)], tmp_path / "chat.jsonl", MineOptions(style="chat", comments=True))
    records = read_jsonl(tmp_path / "chat.jsonl")
    asks = {r["messages"][0]["content"].split("\n\n")[-1]: r["messages"][1]["content"] for r in records}
    assert asks["Join the words with single spaces and end with a full stop."] == (
        '```python\n# Join the words with single spaces and end with a full stop.\ndef sentence(words):\n'
        '    text = " ".join(words)\n    return text + "."\n```')
    answer = asks["Return the area of a circle of the given radius."]
    assert answer.startswith("```python\ndef area(radius):\n    squared") and '"""' not in answer
    manifest = build_sft(tmp_path / "chat.jsonl", tmp_path / "sft", tiny_tokenizer, val_fraction=0.0)
    assert manifest["examples"]["train"] == len(records) == 4
    assert len(open_sft(tmp_path / "sft", "train")) == 4


def test_cli_writes_pairs_and_a_summary(tmp_path, capsys):
    root = write_tree(tmp_path / "src")
    assert cli_main(["data", "sft-pairs", str(root), "--out", str(tmp_path / "p.jsonl"), "--max-pairs", "2"]) == 0
    assert len(read_jsonl(tmp_path / "p.jsonl")) == 2
    assert "pairs written" in capsys.readouterr().out
    assert cli_main(["data", "sft-pairs", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "q.jsonl")]) == 1
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [2])
def test_workers_give_the_same_file(tmp_path, workers):
    root = write_tree(tmp_path / "src")
    one = mine_pairs([str(root)], tmp_path / "one.jsonl")
    many = mine_pairs([str(root)], tmp_path / "many.jsonl", workers=workers)
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "many.jsonl").read_bytes()
    assert one.counts == many.counts
