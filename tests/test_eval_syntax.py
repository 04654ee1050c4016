"""Syntax validity: header extraction, cutting a completion at the function's end, the parse verdict."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from unmask.cli import main
from unmask.eval.syntax import cut_at_function_end, extract_headers, parses, sample_headers

SOURCE = textwrap.dedent(
    '''
    import os


    def plain(a, b):
        return a + b


    def one_liner(x): return x


    class Box:
        @property
        def size(self) -> int:
            """How big."""
            return 3

        async def fetch(
            self,
            url: str,
        ) -> bytes:
            # a comment before the body
            return b""
    '''
)


def test_headers_are_the_def_lines_dedented_without_one_liners() -> None:
    headers = extract_headers(SOURCE, "box.py")
    assert [h.text for h in headers] == [
        "def plain(a, b):",
        "def size(self) -> int:",
        "async def fetch(\n    self,\n    url: str,\n) -> bytes:",
    ]
    assert [h.line for h in headers] == [5, 14, 18]
    assert all(h.source == "box.py" for h in headers)
    assert extract_headers("def broken(:\n    pass\n") == []


def test_a_completion_is_cut_where_the_function_ends() -> None:
    header = "def f(a):"
    cut, ended = cut_at_function_end(header, "\n    b = a * 2\n\n    return b\nx = f(3)\nprint(x)\n", ran_out=False)
    assert cut == "\n    b = a * 2\n\n    return b" and ended
    cut, ended = cut_at_function_end(header, "\n    b = a * 2\n    return (b +", ran_out=True)
    assert cut == "\n    b = a * 2" and not ended  # the unfinished last line of a budget-stopped completion is dropped
    cut, ended = cut_at_function_end(header, "\n    return a", ran_out=False)
    assert cut == "\n    return a" and not ended  # the model ended it itself (EOS): nothing is dropped


def test_completions_that_parse_count_and_others_do_not() -> None:
    header = "def f(a):"
    good = ["\n    return a", "\n    if a:\n        return 1\n    return 2", " return a", "\n    pass  # nothing"]
    bad = ["\n    return (a", "\nreturn a", "", "\n    if a:\n    return 1", "\n    x = = 1"]
    assert all(parses(header, c) for c in good)
    assert not any(parses(header, c) for c in bad)
    multi = "async def fetch(\n    self,\n) -> bytes:"
    assert parses(multi, "\n    return await self.get()") and not parses(multi, "\n    await")


def test_samples_are_deterministic_and_in_file_order() -> None:
    docs = [("a.py", SOURCE), ("b.py", SOURCE.replace("plain", "other"))]
    everything = sample_headers(docs, None, seed=0)
    assert len(everything) == 6
    two = sample_headers(docs, 2, seed=5)
    assert two == sample_headers(docs, 2, seed=5) and len(two) == 2
    assert [everything.index(h) for h in two] == sorted(everything.index(h) for h in two)


def test_eval_syntax_command_on_named_files(tiny_model_dir: Path, tiny_ar_model_dir: Path, tmp_path: Path, capsys) -> None:
    source = tmp_path / "held.py"
    source.write_text(SOURCE)
    for model, mode in ((tiny_model_dir, "diffusion"), (tiny_ar_model_dir, "ar")):
        out = tmp_path / "syntax.json"
        code = main(["eval", "syntax", "--model", str(model), "--data", str(source), "--max-new-tokens", "12",
                     "--steps", "6", "--device", "cpu", "--json", str(out)])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "Syntax-valid" in captured.out
        record = json.loads(out.read_text())
        assert record["headers"] == 3 and record["decoding"]["mode"] == mode
        assert "named files" in record["headers_source"]
        for r in record["results"]:
            assert r["parses"] == parses(r["header"], r["completion"])
        assert record["valid"] == sum(r["parses"] for r in record["results"])


def test_eval_syntax_reports_a_bad_data_path_in_one_line(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    code = main(["eval", "syntax", "--model", str(tiny_model_dir), "--data", str(tmp_path / "missing"), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 1 and captured.err.startswith("unmask: error:") and "missing" in captured.err
    assert "Traceback" not in captured.err


def test_a_model_cards_training_summary_names_its_held_out_shards(tmp_path):
    """A shipped model's training.json summarises its config as a line of text and keeps the data section
    beside it; the held-out split is found from that section (and a missing directory is one clear error)."""
    import pytest

    from unmask.errors import UnmaskError
    from unmask.eval.heldout import heldout_documents

    summary = {"config": "configs/x.toml (stopped at step 50)", "data": {"shards": str(tmp_path / "gone")}}
    with pytest.raises(UnmaskError, match="not here"):
        heldout_documents(summary)
