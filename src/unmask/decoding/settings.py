"""The decoding settings a user may choose, declared once; flags, request fields and checks come from here.

Each ``Setting`` is a ``GenerationConfig`` field a user sets: its type, bounds, help, and its
names on the command line (``--max-new-tokens``) and in an HTTP request (``max_tokens``). Its
default is ``GenerationConfig``'s own, read from the dataclass, never written a second time.
``unmask.commands.flags`` makes argparse flags of them, ``unmask.serve.schemas`` pydantic request
fields, and ``unmask.decoding.defaults`` checks a model's ``decoding.json`` against them, so all
three accept and refuse the same values.

A setting with ``policy`` is that policy's parameter (``threshold``, ``factor``): given without a
policy it selects that policy (``defaults.commit_policy``). A new policy with a parameter is its
class and ``POLICIES`` entry (``policies``), its ``GenerationConfig`` field, and one entry here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cache
from typing import Any

from unmask.bounds import Bounds
from unmask.decoding.caches import CACHES
from unmask.decoding.policies import POLICIES
from unmask.errors import UnmaskError

MAX_SEED = 2**63 - 1  # seeds are 64-bit signed integers (torch.Generator.manual_seed)


class SettingError(UnmaskError):
    """A decoding choice that cannot be honoured, naming the setting at fault (a server's ``param``)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting  # a Setting's name (GenerationConfig field)


@dataclass(frozen=True)
class Setting:
    """One user-facing ``GenerationConfig`` field."""

    name: str  # the GenerationConfig field it sets
    kind: type  # int, float or str: what a flag's text is parsed as, what a request field must hold
    help: str  # what it does, for a flag's help and a field's description
    bounds: Bounds = Bounds()  # numbers: the range allowed
    choices: tuple[str, ...] = ()  # strings: the values allowed
    unset: str | None = None  # what leaving it unset means, where the default is None
    policy: str | None = None  # the policy this is the parameter of; given alone, it selects that policy
    http: str | None = None  # the request field's name, where it differs from ``name``
    per_request: bool = True  # False: a server fixes it when it starts (a flag of `unmask serve`)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def field(self) -> str | None:
        """The HTTP request field, or None for a setting a request cannot choose."""
        return (self.http or self.name) if self.per_request else None

    @property
    def default(self) -> Any:
        return config_defaults()[self.name]

    def problem(self, value: Any) -> str | None:
        """Why ``value`` (parsed from a flag or JSON) is not allowed, or None when it is."""
        if self.choices:
            return None if value in self.choices else f"must be one of {', '.join(self.choices)}"
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else self.kind):
            return {int: "must be an integer", float: "must be a number"}.get(self.kind, f"must be a {self.kind.__name__}")
        if self.kind is float and not math.isfinite(value):
            return "must be a finite number"
        return self.bounds.problem(value) if self.kind in (int, float) else None


@cache
def config_defaults() -> dict[str, Any]:
    """``GenerationConfig``'s field defaults: the one place they are written (read when first asked, so
    that this module can be imported while ``unmask.decoding`` is still being set up)."""
    from unmask.decoding import GenerationConfig

    return {f.name: f.default for f in dataclasses.fields(GenerationConfig) if f.default is not dataclasses.MISSING}


def parameter_of(name: str) -> str:
    """The policy whose parameter the ``GenerationConfig`` field ``name`` is (its class says so)."""
    return next(policy for policy, cls in POLICIES.items() if cls.parameter == name)


SETTINGS: tuple[Setting, ...] = (
    Setting("max_new_tokens", int, "length of the canvas", Bounds(1), http="max_tokens"),
    Setting("steps", int, "total denoising steps over the canvas (with --policy threshold or factor: a cap)", Bounds(1),
            unset="one token per step"),
    Setting("block_size", int, "semi-autoregressive block length", Bounds(1)),
    Setting("policy", str, "which predictions to commit each step", choices=tuple(POLICIES)),
    Setting("threshold", float, "commit every prediction at least this probable (tau of the threshold policy)",
            Bounds(0.0, 1.0), policy=parameter_of("threshold")),
    Setting("factor", float, "f of the factor policy: commit the n most probable predictions, n the largest with "
            "(n + 1)(1 - c_n) < f", Bounds(0.0, low_open=True), policy=parameter_of("factor")),
    Setting("temperature", float, "sampling temperature; 0 takes the most likely token", Bounds(0.0, 2.0)),
    Setting("top_k", int, "sample among the K most likely tokens only", Bounds(1), unset="all"),
    Setting("top_p", float, "sample among the most likely tokens that together hold probability P",
            Bounds(0.0, 1.0, low_open=True), unset="1, all"),
    Setting("seed", int, "random seed of sampling and of the random policies", Bounds(0, MAX_SEED),
            unset="a fresh one"),
    Setting("cache", str, "block KV cache: approximate for bidirectional models, exact for block-causal ones",
            choices=CACHES, per_request=False),
    Setting("cache_refresh", int, "with a cache: recompute the whole canvas every N steps", Bounds(1),
            unset="at block starts only", per_request=False),
)
SETTING: dict[str, Setting] = {s.name: s for s in SETTINGS}
PARAMETERS: tuple[Setting, ...] = tuple(s for s in SETTINGS if s.policy is not None)  # policies' parameters
