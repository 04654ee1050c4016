"""The one declaration of the decoding settings: GenerationConfig's fields, the CLI's flags, the policies'
parameters and the commit rule all agree with it (the server's fields: ``test_serve``)."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import unmask
from unmask.cli import build_parser
from unmask.commands.flags import generation_config
from unmask.decoding import GenerationConfig, StepPlan, decode, make_policy
from unmask.decoding.defaults import CHOSEN, DEFAULT_BLOCK, DecodingChoice, commit_policy, read_model_choice
from unmask.decoding.settings import PARAMETERS, SETTING, SETTINGS, Setting, SettingError
from unmask.errors import UnmaskError

from test_cli import run_cli

# Commands whose flags carry every decoding setting.
DECODING_COMMANDS = (["generate"], ["infill", "--prefix", "a", "--suffix", "b"], ["chat"], ["eval", "humaneval"],
                     ["eval", "infill"], ["eval", "syntax"])


def probes(s: Setting) -> tuple[list, list]:
    """Values at and just past each end of ``s``'s range: (allowed, refused), of the setting's type."""
    if s.choices:
        return list(s.choices), ["nope"]
    step = 1 if s.kind is int else 0.01
    ok, bad = [], []
    low, high = s.bounds.low, s.bounds.high
    if low is not None:
        ok.append(s.kind(low + step if s.bounds.low_open else low))
        bad.append(s.kind(low if s.bounds.low_open else low - step))
    if high is not None:
        ok.append(s.kind(high))
        bad.append(s.kind(high + step) if s.kind is int else high + step)
    return ok, bad


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_every_setting_is_a_config_field_with_its_default():
    defaults = {f.name: f.default for f in dataclasses.fields(GenerationConfig)}
    for s in SETTINGS:
        assert s.name in defaults, s.name
        assert s.default == defaults[s.name] and (s.default is not None or s.unset), s.name
        if s.default is not None and not s.choices:
            assert s.problem(s.default) is None, s.name  # the library's default lies in the declared range
    assert GenerationConfig().block_size == DEFAULT_BLOCK  # the CLI's help says DEFAULT_BLOCK is the fallback


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: s.name)
def test_every_setting_is_a_flag_with_the_declared_default_and_bounds(s: Setting, capsys):
    ok, bad = probes(s)
    assert ok and bad
    for command in DECODING_COMMANDS:
        args = parse(*command)
        expected = {"max_new_tokens": args.max_new_tokens, "seed": 0}.get(s.name, s.default)
        if s.name in CHOSEN:
            expected = None  # left to resolve: the model's decoding.json may still say
        assert getattr(args, s.name) == expected, (command, s.name)
        for value in ok:
            assert getattr(parse(*command, s.flag, str(value)), s.name) == value
        for value in bad:
            with pytest.raises(SystemExit) as exit:
                parse(*command, s.flag, str(value))
            assert exit.value.code == 2 and s.flag in capsys.readouterr().err.splitlines()[-1]


def test_the_flags_help_is_the_declared_help():
    generate = next(a for a in build_parser(complete=True)._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.option_strings[0]: a.help for a in generate.choices["generate"]._actions if a.option_strings}
    for s in SETTINGS:
        assert helps[s.flag].startswith(s.help), s.flag
    text = " ".join(run_cli("generate", "--help", env={"COLUMNS": "1000"}).stdout.split())
    assert "length of the canvas (default: 64)" in text
    assert "alone, it selects --policy factor (default: the model's decoding.json, else 1.0)" in text


def test_help_and_version_leave_torch_unimported():
    """Also the help of the commands that run no model: only a command that decodes builds decoding flags."""
    code = ("import sys, unmask.cli\n"
            "for argv in (['--help'], ['--version'], ['pull', '--help'], ['data', 'build', '--help'],\n"
            "             ['data', 'distill', '--help']):\n"
            "    try:\n        unmask.cli.main(argv)\n    except SystemExit as e:\n        assert e.code == 0\n"
            "print(sorted(m for m in ('torch', 'numpy', 'unmask.decoding') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "generate" in proc.stdout and "unmask " in proc.stdout


@pytest.mark.parametrize("p", PARAMETERS, ids=lambda p: p.name)
def test_a_parameter_is_the_config_field_its_policy_reads(p: Setting):
    sorted_scores = torch.tensor([0.99, 0.9, 0.8, 0.6, 0.3])
    plan = StepPlan(masked=5, quota=1, steps_left=5)
    counts = {make_policy(GenerationConfig(policy=p.policy, **{p.name: v})).count(sorted_scores, plan)
              for v in (p.default / 2, p.default)}
    assert len(counts) == 2
    assert p.name in {f.name for f in dataclasses.fields(DecodingChoice)}  # resolve carries it


def test_a_parameter_alone_selects_its_policy_and_refuses_another():
    for p in PARAMETERS:
        assert commit_policy(DecodingChoice(**{p.name: p.default})) == p.policy
        other = next(name for name in SETTING["policy"].choices if name != p.policy)
        with pytest.raises(SettingError, match=f"{p.policy} policy") as info:
            commit_policy(DecodingChoice(policy=other, **{p.name: p.default}))
        assert info.value.setting == p.name
    assert commit_policy(DecodingChoice()) == SETTING["policy"].default
    with pytest.raises(SettingError, match="different policies"):
        commit_policy(DecodingChoice(threshold=0.5, factor=1.0))


def test_factor_reaches_the_config_from_the_flags_and_decoding_json(tiny_model_dir: Path, tmp_path: Path):
    loaded = unmask.load(tiny_model_dir, device="cpu")
    config = generation_config(parse("generate", "x", "--factor", "2.5"), loaded)
    assert (config.policy, config.factor) == ("factor", 2.5)
    config = generation_config(parse("generate", "x", "--policy", "factor"), loaded)
    assert (config.policy, config.factor) == ("factor", SETTING["factor"].default)
    (tmp_path / "decoding.json").write_text('{"factor": 3}')
    assert read_model_choice(tmp_path) == DecodingChoice(factor=3)
    (tmp_path / "decoding.json").write_text('{"factor": 0}')
    with pytest.raises(UnmaskError, match="factor must be > 0"):
        read_model_choice(tmp_path)


def test_generate_with_factor_writes_what_the_library_writes(tiny_model_dir: Path):
    proc = run_cli("generate", "def add(a, b):", "--model", str(tiny_model_dir), "--max-new-tokens", "12",
                   "--factor", "3", "--no-token-healing", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    loaded = unmask.load(tiny_model_dir, device="cpu")
    ref = decode(loaded.model, [loaded.tokenizer.encode("def add(a, b):")],
                 GenerationConfig(max_new_tokens=12, policy="factor", factor=3.0, seed=0))
    assert ref.nfe < 12  # the factor policy commits several tokens a step here; the default, one
    assert proc.stdout.rstrip("\n") == loaded.tokenizer.decode(ref.sequences[0])
    assert f"NFE {ref.nfe} " in proc.stderr, proc.stderr
    mixed = run_cli("generate", "x", "--model", str(tiny_model_dir), "--factor", "3", "--policy", "margin")
    assert mixed.returncode == 1 and mixed.stderr.strip() == "unmask: error: a factor applies to the factor policy, not margin"
