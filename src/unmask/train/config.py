"""Training configuration: a TOML file with ``[model]``, ``[data]`` and ``[train]`` sections.

Every field is checked on load: an unknown key or a value of the wrong type is an ``UnmaskError``
naming the key. Relative paths are resolved against the directory of the config file, and the
placeholder ``{stdlib}`` in a data path stands for the running interpreter's standard library.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
import sys
import sysconfig
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from unmask.errors import UnmaskError
from unmask.models.config import ModelConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

STDLIB_PLACEHOLDER = "{stdlib}"
LORA_PATTERN = re.compile(r"lora:([1-9][0-9]*)")


def lora_rank(trainable: str) -> int | None:
    """R of ``trainable = "lora:R"`` (low-rank training, unmask.train.lora), else None."""
    match = LORA_PATTERN.fullmatch(trainable)
    return int(match.group(1)) if match else None


@dataclass
class DataConfig:
    """Where the training tokens come from and how they are cut into windows."""

    shards: str | None = None  # a token shard directory written by `unmask data build` (memory-mapped; the usual choice)
    paths: list[str] = field(default_factory=list)  # or: corpus files, directories or globs; "{stdlib}" = Python's standard library
    suffixes: list[str] = field(default_factory=lambda: [".py"])  # file endings collected from directories
    tokenizer: str | None = None  # directory holding tokenizer.json; with shards, default: the copy inside the shard directory
    train_tokens: str | None = None  # instead of paths + tokenizer: a .npy array of token ids, documents joined by EOS
    val_tokens: str | None = None  # the validation twin of train_tokens (.npy); optional
    sft: str | None = None  # or: SFT examples, a JSONL file of {"messages": [...]} or {"prompt", "completion"} (needs tokenizer; see unmask.train.sft)
    sft_val: str | None = None  # held-out SFT examples (JSONL); without it val_fraction of sft is held out by hash
    sft_pad: Literal["eos", "ignore"] = "eos"  # SFT window tail: EOS counted as answer (LLaDA), or pad never masked nor a target
    seq_len: int = 256  # tokens per training window
    val_fraction: float = 0.02  # with paths: share of files held out for validation (split by file content hash)
    max_files: int | None = None  # use at most this many files (chosen by content hash, so a uniform sample)
    max_tokens: int | None = None  # use only the first this many tokens (both splits; train and val in proportion)
    workers: int = 1  # with paths: processes tokenising the corpus into out_dir/data


@dataclass
class TrainSection:
    """The optimisation: objective, schedule, cadence of evaluation/checkpoints, where outputs go."""

    objective: Literal["diffusion", "sft", "block", "ar", "adapt"] = "diffusion"  # training loss (see unmask.diffusion.objectives; adapt: unmask.diffusion.adapt)
    init_from: str | None = None  # start from this AR model's weights (a name, model directory or .gguf file); its tokenizer must be the data's
    distill: float = 0.0  # adapt: weight of the KL divergence to init_from's own next-token distributions (0 = cross-entropy only)
    trainable: str = "all"  # which weights train: "all", "no_embed" (embedding/head frozen), "top:N" (the last N blocks and the final norm) or "lora:R" (rank-R factors of every block matrix, and the norms; see unmask.train.lora)
    init_delta: str | None = None  # lora:R: start the factors (and norms) from this delta directory over init_from, e.g. a shipped model
    anneal_steps: int = 0  # adapt with full attention: steps over which attention opens from causal to bidirectional (0 = at once)
    steps: int = 1000  # optimizer steps to run (a later run with more steps resumes and continues)
    decay_steps: int | None = None  # length of warmup + cosine decay; None = steps (set it to split one schedule over runs)
    batch_size: int = 16  # windows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate, reached after warmup_steps
    min_lr: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 100  # linear warmup from 0 to lr
    weight_decay: float = 0.1  # AdamW decay of matrices (norms, biases and embeddings are not decayed)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW (beta1, beta2)
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    eval_every: int = 200  # validate every this many steps (and at the end); 0 = only at the end
    eval_batches: int = 8  # validation batches (of batch_size fixed windows each)
    ckpt_every: int = 200  # write a checkpoint every this many steps (and at the end); 0 = only at the end
    keep_checkpoints: int = 3  # keep the newest this many checkpoints
    log_every: int = 10  # write a metrics line every this many steps
    seed: int = 0  # seeds the initialisation, the batches and the masking noise
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when available (under torchrun: GPU LOCAL_RANK)
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (DDP) or shard per block (FSDP2 fully_shard)
    out_dir: str = ""  # outputs (data cache, checkpoints, final model, metrics); "" = runs/<config name>
    save_dtype: Literal["float32", "bfloat16"] = "float32"  # dtype of the final model's weights
    max_shard_mb: float | None = None  # split the final model's weights into safetensors shards of at most this many MiB


@dataclass
class TrainConfig:
    """A whole training run, as loaded from one TOML file."""

    model: dict[str, Any]  # ModelConfig fields; vocab size and special ids default to the tokenizer's
    data: DataConfig
    train: TrainSection
    source: Path  # the config file (relative paths were resolved against its directory)

    @property
    def out_dir(self) -> Path:
        return Path(self.train.out_dir)

    @property
    def decay_steps(self) -> int:
        return self.train.decay_steps or self.train.steps

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": dict(self.model),
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
        }

    def resume_fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint must share with this config for resuming to be exact."""
        t = self.train
        keys = ("objective", "batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay", "betas", "grad_clip", "seed")
        # Adaptation settings count only when set, so runs from before they existed still resume.
        defaults = TrainSection()
        adapt = {k: getattr(t, k) for k in ("init_from", "distill", "trainable", "anneal_steps", "init_delta") if getattr(t, k) != getattr(defaults, k)}
        return {"model": dict(self.model), "seq_len": self.data.seq_len, **{k: getattr(t, k) for k in keys}, **adapt}


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_value(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked against the type hint ``hint`` (ints are accepted as floats)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return check_value(value, option, key)
            except UnmaskError:
                continue
        raise UnmaskError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise UnmaskError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UnmaskError(f"{key}: expected a list, got {value!r}")
        return [check_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise UnmaskError(f"{key}: expected a table, got {value!r}")
        return value
    if hint is type(None):
        if value is not None:
            raise UnmaskError(f"{key}: expected nothing, got {value!r}")
        return value
    if hint is Any:
        return value
    if isinstance(hint, type) and issubclass(hint, enum.Enum):  # e.g. AttentionMode, written by its name
        try:
            return hint(value)
        except ValueError:
            raise UnmaskError(f"{key}: expected one of {[m.value for m in hint]}, got {value!r}") from None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool):
        raise UnmaskError(f"{key}: expected int, got {value!r}")
    if not isinstance(value, hint):
        raise UnmaskError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    return value


def _build(cls: type, table: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise UnmaskError(f"[{section}] unknown key {unknown[0]!r} (known: {', '.join(names)})")
    return cls(**{k: check_value(v, hints[k], f"[{section}] {k}") for k, v in table.items()})


def _check_model_table(table: dict[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(ModelConfig)
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    out = {}
    for key, value in table.items():
        if key not in hints:
            raise UnmaskError(f"[model] unknown key {key!r} (known: {', '.join(names)})")
        out[key] = check_value(value, hints[key], f"[model] {key}")
    return out


def _merge(raw: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Apply overrides given as ``{"train": {"steps": 10}}`` or ``{"train.steps": 10}``."""
    for key, value in overrides.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        elif "." in key:
            section, name = key.split(".", 1)
            raw.setdefault(section, {})[name] = value
        else:
            raise UnmaskError(f"override {key!r}: expected 'section.key' or a section table")


def _resolve_path(value: str, base: Path) -> str:
    value = value.replace(STDLIB_PLACEHOLDER, sysconfig.get_paths()["stdlib"])
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def _validate(cfg: TrainConfig) -> None:
    d, t = cfg.data, cfg.train

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise UnmaskError(f"{cfg.source}: {msg}")

    sources = [name for name, given in (("shards", d.shards is not None), ("paths", bool(d.paths)),
                                        ("train_tokens", d.train_tokens is not None), ("sft", d.sft is not None)) if given]
    need(len(sources) == 1, "[data] needs exactly one of shards, paths (with a tokenizer), train_tokens or sft"
         + (f", not {' and '.join(sources)}" if sources else ""))
    need(d.sft is None or d.tokenizer is not None, "[data] sft needs a tokenizer directory (its chat template renders the examples)")
    need(d.sft_val is None or d.sft is not None, "[data] sft_val goes with sft")
    need(d.sft is None or d.max_tokens is None, "[data] max_tokens does not apply to sft")
    need(t.objective != "sft" or d.sft is not None, "[train] objective 'sft' needs [data] sft (a JSONL file of examples)")
    need(d.sft is None or t.objective in ("sft", "adapt", "ar"),
         f"[data] sft trains objective 'sft', 'adapt' or 'ar', not {t.objective!r}")
    if d.paths:
        need(d.tokenizer is not None, "[data] paths need a tokenizer directory")
    need(d.max_files is None or bool(d.paths), "[data] max_files applies to paths only")
    need(d.val_tokens is None or d.train_tokens is not None, "[data] val_tokens goes with train_tokens")
    need(d.workers > 0, f"[data] workers must be positive, got {d.workers}")
    need(d.max_tokens is None or d.max_tokens > 0, "[data] max_tokens must be positive")
    for name in ("seq_len", "steps", "batch_size", "grad_accum", "eval_batches", "log_every", "keep_checkpoints"):
        value = getattr(d if name == "seq_len" else t, name)
        need(value > 0, f"{name} must be positive, got {value}")
    for name in ("warmup_steps", "eval_every", "ckpt_every"):
        need(getattr(t, name) >= 0, f"[train] {name} must be >= 0")
    need(d.seq_len >= 2, "[data] seq_len must be at least 2")
    need(0.0 <= d.val_fraction < 1.0, f"[data] val_fraction must be in [0, 1), got {d.val_fraction}")
    need(t.decay_steps is None or t.decay_steps > 0, "[train] decay_steps must be positive")
    need(t.lr > 0 and 0 <= t.min_lr <= t.lr, "[train] need lr > 0 and 0 <= min_lr <= lr")
    need(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "[train] betas must be two numbers in [0, 1)")
    need(t.grad_clip >= 0 and t.weight_decay >= 0, "[train] grad_clip and weight_decay must be >= 0")
    need(0.0 <= t.distill <= 1.0, f"[train] distill must be in [0, 1], got {t.distill}")
    need(t.anneal_steps >= 0, "[train] anneal_steps must be >= 0")
    need(t.trainable in ("all", "no_embed") or (t.trainable.startswith("top:") and t.trainable[4:].isdigit()
                                                and int(t.trainable[4:]) > 0) or lora_rank(t.trainable) is not None,
         f"[train] trainable must be 'all', 'no_embed', 'top:N' or 'lora:R', got {t.trainable!r}")
    need(t.init_delta is None or (lora_rank(t.trainable) is not None and t.init_from is not None),
         "[train] init_delta needs trainable = 'lora:R' and init_from (the delta's base)")
    need(t.init_delta is None or Path(t.init_delta).is_dir(), f"[train] init_delta {t.init_delta} is not a directory")
    need(t.objective == "adapt" or (t.distill == 0 and t.anneal_steps == 0),
         "[train] distill and anneal_steps belong to objective 'adapt'")
    need(t.objective != "adapt" or t.init_from is not None, "[train] objective 'adapt' needs init_from (an AR model)")
    for pattern in d.paths:
        if not any(c in pattern for c in "*?[") and not Path(pattern).exists():
            raise UnmaskError(f"{cfg.source}: [data] path {pattern} does not exist")
    for name in ("shards", "tokenizer", "train_tokens", "val_tokens", "sft", "sft_val"):
        value = getattr(d, name)
        if value is not None and not Path(value).exists():
            raise UnmaskError(f"{cfg.source}: [data] {name} {value} does not exist")


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read, check and resolve a training config file (``overrides`` replace keys before checking)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UnmaskError(f"{path}: config file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UnmaskError(f"{path}: not valid TOML ({exc})") from None
    _merge(raw, overrides or {})
    unknown = sorted(set(raw) - {"model", "data", "train"})
    if unknown:
        raise UnmaskError(f"{path}: unknown section [{unknown[0]}] (expected [model], [data], [train])")
    for section in ("model", "data", "train"):
        if not isinstance(raw.get(section, {}), dict):
            raise UnmaskError(f"{path}: {section} must be a table")
    base = path.resolve().parent
    data = _build(DataConfig, raw.get("data", {}), "data")
    train = _build(TrainSection, raw.get("train", {}), "train")
    data.paths = [_resolve_path(p, base) for p in data.paths]
    for name in ("shards", "tokenizer", "train_tokens", "val_tokens", "sft", "sft_val"):
        if getattr(data, name) is not None:
            setattr(data, name, _resolve_path(getattr(data, name), base))
    train.out_dir = _resolve_path(train.out_dir or f"runs/{path.stem}", base)
    if train.init_delta is not None:
        train.init_delta = _resolve_path(train.init_delta, base)
    cfg = TrainConfig(model=_check_model_table(raw.get("model", {})), data=data, train=train, source=path)
    _validate(cfg)
    return cfg
