"""Building token shards: source files -> documents -> deduplicated, split, tokenised shards.

Four stages, the two slow ones in worker processes:

1. scan: read every document once, skip the ones that cannot be used (binary, oversized, ...)
   and hash the rest (SHA-256 of the UTF-8 text);
2. plan: drop exact duplicates (the first path in sorted order stays), order by content hash,
   send a document to validation when its hash maps below ``val_fraction`` (so no file is in
   both splits, whatever the order of the sources or the number of workers), and pack
   consecutive documents into shards of about ``shard_bytes`` of text; a shard's key hashes
   its documents, the tokenizer and the dtype;
3. tokenise: workers read the documents of a chunk again and encode them; the parent joins the
   chunks of a shard in plan order, each document followed by EOS, and writes the shard;
4. record: the manifest is rewritten after each finished shard. A re-run whose plan gives a
   shard the same key reuses the file on disk, so an interrupted build resumes.

The result does not depend on the number of workers. Nothing here imports torch, so worker
processes start quickly.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from unmask.errors import UnmaskError
from unmask.train.corpus import (
    DEFAULT_SUFFIXES,
    MAX_DOC_BYTES,
    UNREADABLE,
    JsonlLine,
    ParquetRows,
    _pyarrow_parquet,
    default_sources,
    find_files,
    parse_jsonl_line,
    read_document,
    read_jsonl_line,
    scan_jsonl,
    scan_parquet,
    source_kind,
)
from unmask.train.shards import (
    FORMAT,
    MANIFEST_NAME,
    SPLITS,
    TOKENIZER_DIR,
    VERSION,
    read_manifest,
    token_dtype,
    write_array_atomic,
    write_json_atomic,
)

DUPLICATE, CHANGED = "duplicate", "changed"
CHUNK_BYTES = 1 << 20  # text per tokenising task: large enough to amortise the IPC, small enough to balance
CHUNK_DOCS = 4096  # and at most this many documents per task
SCAN_FILES = 64  # whole files per scanning task
T = TypeVar("T")


class Encoder(Protocol):
    """What the builder needs of a tokenizer (``unmask.tokenizer.Tokenizer`` is one)."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def eos_id(self) -> int | None: ...
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


@dataclass
class BuildOptions:
    """How sources become shards."""

    val_fraction: float = 0.02  # share of documents held out for validation (decided by content hash)
    workers: int = 1  # processes that scan and tokenise; 1 = all in this process
    suffixes: tuple[str, ...] = DEFAULT_SUFFIXES  # file endings collected from directories
    text_field: str = "text"  # the field holding the text in JSONL records and Parquet rows
    max_doc_bytes: int = MAX_DOC_BYTES  # larger documents are skipped as oversized
    shard_bytes: int = 32 << 20  # source text per shard (about 8-10M tokens of code)
    max_files: int | None = None  # keep at most this many documents, the first in hash order (a uniform sample)
    dtype: str = "auto"  # token dtype on disk: auto (uint16 when the vocabulary fits), uint16 or uint32
    progress: bool = True  # draw progress bars when stderr is a terminal


@dataclass(frozen=True)
class Doc:
    """One usable document and where to read it again."""

    path: str  # the file
    kind: str  # file | jsonl | parquet
    record: int | None  # line (JSONL) or row (Parquet) number, 0-based; None for a whole file
    offset: int  # JSONL: byte offset of the line
    length: int  # JSONL: byte length of the line
    digest: str  # SHA-256 of the UTF-8 text
    nbytes: int  # length of the UTF-8 text


@dataclass
class Shard:
    """A planned shard: its documents, its key, and once written, its token counts."""

    name: str  # e.g. train-00003
    split: str  # train | val
    docs: list[Doc]  # in plan (content-hash) order
    key: str  # hash of the documents, the tokenizer and the dtype: equal key, equal file
    tokens: list[int] | None = None  # per document, EOS included (None: not written yet; 0: dropped)
    max_id: int = -1  # largest token id in the shard

    @property
    def file(self) -> str:
        return f"{self.name}.npy"


@dataclass
class BuildResult:
    """What a build did (the manifest holds the rest)."""

    root: Path  # the shard directory
    manifest: dict[str, Any]  # as written to manifest.json
    written: int  # shards tokenised by this run
    reused: int  # shards found finished from an earlier run
    wall_s: float  # seconds this run took

    def summary_rows(self) -> list[tuple[str, str]]:
        """(label, value) rows for the summary table."""
        totals = self.manifest["totals"]
        rows = [("files found", f"{totals['documents_found']:,}"), ("files kept", f"{totals['files']:,}")]
        for reason, count in sorted(totals["skipped"].items()):
            rows.append((f"skipped: {reason}", f"{count:,}"))
        rows += [
            ("tokens train", f"{totals['tokens']['train']:,}"),
            ("tokens val", f"{totals['tokens']['val']:,}"),
            ("shards", f"{totals['shards']['train']} train + {totals['shards']['val']} val "
                       f"({self.written} written, {self.reused} reused)"),
            ("dtype", self.manifest["dtype"]),
            ("wall time", f"{self.wall_s:.1f} s"),
        ]
        return rows


def content_score(digest: str) -> float:
    """A number in [0, 1) from a content hash: the document's side of the split."""
    return int(digest[:16], 16) / float(1 << 64)


def split_documents(
    docs: Sequence[T], val_fraction: float, max_files: int | None = None, digest: Callable[[T], str] = lambda d: d[0]
) -> tuple[list[T], list[T]]:
    """(train, val), decided by the content hash alone, each in sample order.

    The split looks at the first 64 bits of the hash; the sample order sorts by the next 64, so
    ``max_files`` keeps a uniform sample whose split is as balanced as the whole corpus'. When
    ``val_fraction`` > 0 and there are at least two documents, validation gets at least one.
    """
    ordered = sorted(docs, key=lambda d: (digest(d)[16:32], digest(d)))
    if max_files is not None:
        ordered = ordered[:max_files]
    val = [d for d in ordered if content_score(digest(d)) < val_fraction]
    if val_fraction > 0 and not val and len(ordered) >= 2:
        val = [ordered[0]]
    val_set = {digest(d) for d in val}
    return [d for d in ordered if digest(d) not in val_set], val


def tokenizer_hash(encoder: Any) -> str:
    """Identifies a tokenizer: its full serialisation plus its special ids (or a stand-in's ``fingerprint``)."""
    backend = getattr(encoder, "backend", None)
    if backend is not None:
        specials = [getattr(encoder, name, None) for name in ("eos_id", "mask_id", "pad_id", "bos_id")]
        text = backend.to_str() + repr(specials)
    else:
        text = str(getattr(encoder, "fingerprint", type(encoder).__qualname__))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---- worker side: everything below runs in the worker processes (or inline with workers=1)

_WORKER: dict[str, Any] = {}


def _init_worker(encoder: Any, field_name: str, max_bytes: int, dtype: str, single_threaded: bool) -> None:
    if single_threaded:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    if isinstance(encoder, str):
        from unmask.tokenizer import Tokenizer

        encoder = Tokenizer.from_dir(encoder)
    _WORKER.update(encoder=encoder, field=field_name, max_bytes=max_bytes, dtype=np.dtype(dtype),
                   parquet=ParquetRows(field_name, max_bytes))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _scan(task: list[tuple[str, str]]) -> tuple[list[Doc], list[tuple[str, int | None, str]]]:
    """Documents and (path, record, reason) skips of a few source files."""
    field_name, max_bytes = _WORKER["field"], _WORKER["max_bytes"]
    docs: list[Doc] = []
    skips: list[tuple[str, int | None, str]] = []
    for path, kind in task:
        try:
            if kind == "file":
                text, reason = read_document(Path(path), max_bytes)
                if text is None:
                    skips.append((path, None, reason or UNREADABLE))
                else:
                    docs.append(Doc(path, kind, None, 0, 0, _sha(text), len(text.encode("utf-8"))))
            elif kind == "jsonl":
                for line, raw in scan_jsonl(Path(path)):
                    text, reason = parse_jsonl_line(raw, field_name, max_bytes)
                    if text is None:
                        skips.append((path, line.index, reason or UNREADABLE))
                    else:
                        docs.append(Doc(path, kind, line.index, line.offset, line.length, _sha(text), len(text.encode("utf-8"))))
            else:
                for row, text, reason in scan_parquet(Path(path), field_name, max_bytes):
                    if text is None:
                        skips.append((path, row, reason or UNREADABLE))
                    else:
                        docs.append(Doc(path, kind, row, 0, 0, _sha(text), len(text.encode("utf-8"))))
        except (OSError, ValueError):
            skips.append((path, None, UNREADABLE))
    return docs, skips


def _read(doc: Doc) -> str | None:
    if doc.kind == "file":
        text = read_document(Path(doc.path), _WORKER["max_bytes"])[0]
    elif doc.kind == "jsonl":
        line = JsonlLine(doc.record or 0, doc.offset, doc.length)
        text = read_jsonl_line(Path(doc.path), line, _WORKER["field"], _WORKER["max_bytes"])[0]
    else:
        text = _WORKER["parquet"].read(Path(doc.path), doc.record or 0)[0]
    return text if text is not None and _sha(text) == doc.digest else None


def _encode(docs: list[Doc]) -> list[np.ndarray | None]:
    """Token arrays (each ending in EOS) of a chunk; None for a document that changed since the scan."""
    encoder, dtype = _WORKER["encoder"], _WORKER["dtype"]
    texts = [_read(d) for d in docs]
    present = [t for t in texts if t is not None]
    encoded = iter(encoder.encode_batch(present)) if present else iter(())
    eos = encoder.eos_id
    return [None if t is None else np.asarray(next(encoded) + [eos], dtype=dtype) for t in texts]


# ---- parent side


@contextlib.contextmanager
def _worker_map(workers: int, initargs: tuple) -> Iterator[Callable]:
    """``map`` over worker processes (spawned: safe beside threads and CUDA), or inline for one."""
    if workers <= 1:
        _init_worker(*initargs[:-1], False)
        yield map
        return
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=initargs)
    try:
        yield pool.map
    except BrokenProcessPool:
        raise UnmaskError("a worker process died (out of memory?); run the same command again to resume") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Bars:
    """Rich progress bars on stderr when it is a terminal; silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=Console(stderr=True))

    def __enter__(self) -> _Bars:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def task(self, description: str, total: int) -> Callable[[int], None]:
        if self.bar is None:
            return lambda n: None
        task_id = self.bar.add_task(description, total=total)
        return lambda n: self.bar.advance(task_id, n)


def _chunks(items: Sequence[T], size_of: Callable[[T], int], limit: int, max_items: int) -> list[list[T]]:
    out: list[list[T]] = []
    current: list[T] = []
    size = 0
    for item in items:
        if current and (size + size_of(item) > limit or len(current) >= max_items):
            out.append(current)
            current, size = [], 0
        current.append(item)
        size += size_of(item)
    if current:
        out.append(current)
    return out


def plan_shards(docs: list[Doc], split: str, shard_bytes: int, salt: str) -> list[Shard]:
    """Consecutive documents packed into shards of about ``shard_bytes`` of text."""
    shards = []
    for i, group in enumerate(_chunks(docs, lambda d: d.nbytes, shard_bytes, sys.maxsize)):
        key = hashlib.sha256((salt + "\n" + "\n".join(d.digest for d in group)).encode()).hexdigest()[:16]
        shards.append(Shard(f"{split}-{i:05d}", split, group, key))
    return shards


def _previous(root: Path) -> dict[str, Any]:
    try:
        return read_manifest(root)
    except UnmaskError:
        return {}


def _reuse(root: Path, shard: Shard, old: dict[str, Any], old_tokens: dict[str, int]) -> bool:
    """Take a finished shard of an earlier run when its key matches and its file is whole."""
    entry = next((s for s in old.get("shards", []) if s["name"] == shard.name), None)
    if entry is None or not entry.get("done") or entry.get("key") != shard.key:
        return False
    try:
        arr = np.load(root / shard.file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return False
    if arr.ndim != 1 or arr.size != entry["tokens"]:
        return False
    shard.tokens = [old_tokens.get(d.digest, 0) for d in shard.docs]
    if sum(shard.tokens) != arr.size:
        shard.tokens = None
        return False
    shard.max_id = int(entry.get("max_id", -1))
    return True


def _manifest(
    sources: list[str], options: BuildOptions, tok: dict[str, Any], dtype: np.dtype, shards: list[Shard],
    found: int, skips: list[tuple[str, int | None, str]],
) -> dict[str, Any]:
    files, skipped = [], [{"path": p, "record": r, "reason": why} for p, r, why in skips]
    tokens = {"train": 0, "val": 0}
    for shard in shards:
        for i, doc in enumerate(shard.docs):
            n = None if shard.tokens is None else shard.tokens[i]
            if n == 0:
                skipped.append({"path": doc.path, "record": doc.record, "reason": CHANGED})
                continue
            files.append({"path": doc.path, "record": doc.record, "hash": doc.digest, "bytes": doc.nbytes,
                          "tokens": n, "split": shard.split, "shard": shard.name})
            tokens[shard.split] += n or 0
    done = [s for s in shards if s.tokens is not None]
    return {
        "format": FORMAT,
        "version": VERSION,
        "complete": len(done) == len(shards),
        "sources": sources,
        "settings": {"val_fraction": options.val_fraction, "suffixes": list(options.suffixes),
                     "text_field": options.text_field, "max_doc_bytes": options.max_doc_bytes,
                     "shard_bytes": options.shard_bytes, "max_files": options.max_files},
        "tokenizer": tok,
        "dtype": dtype.name,
        "totals": {
            "documents_found": found,
            "files": len(files),
            "skipped": dict(sorted(Counter(s["reason"] for s in skipped).items())),
            "tokens": tokens,
            "shards": {split: sum(s.split == split for s in shards) for split in ("train", "val")},
        },
        "shards": [{"name": s.name, "split": s.split, "file": s.file, "key": s.key, "files": len(s.docs),
                    "tokens": None if s.tokens is None else sum(s.tokens), "max_id": s.max_id,
                    "done": s.tokens is not None} for s in shards],
        "files": files,
        "skipped": skipped,
    }


def _check_options(options: BuildOptions) -> None:
    if not 0.0 <= options.val_fraction < 1.0:
        raise UnmaskError(f"val_fraction must be in [0, 1), got {options.val_fraction}")
    if options.workers < 1 or options.shard_bytes < 1 or options.max_doc_bytes < 1:
        raise UnmaskError("workers, shard size and the document size limit must be positive")
    if options.dtype not in ("auto", "uint16", "uint32"):
        raise UnmaskError(f"dtype must be auto, uint16 or uint32, got {options.dtype!r}")
    if options.max_files is not None and options.max_files < 1:
        raise UnmaskError(f"max_files must be positive, got {options.max_files}")


def build_shards(
    sources: Sequence[str], out_dir: str | Path, encoder: Encoder, options: BuildOptions | None = None,
    files: Sequence[Path] | None = None,
) -> BuildResult:
    """Turn ``sources`` (files, directories, globs; empty = stdlib + site-packages) into shards in ``out_dir``.

    ``encoder`` is a ``Tokenizer`` (copied to ``out_dir/tokenizer`` and reloaded by each worker)
    or any picklable object with ``vocab_size``, ``eos_id`` and ``encode_batch``. ``files``, when
    given, is the already resolved file list of ``sources``.
    """
    started = time.perf_counter()
    options = options or BuildOptions()
    _check_options(options)
    root = Path(out_dir)
    sources = list(sources) or default_sources()
    files = list(files) if files is not None else find_files(sources, tuple(options.suffixes))
    if not files:
        raise UnmaskError(f"no files with suffixes {list(options.suffixes)} under {' '.join(sources)}")
    kinds = [(str(p), source_kind(p)) for p in files]
    if any(kind == "parquet" for _, kind in kinds):
        _pyarrow_parquet()
    if encoder.eos_id is None:
        raise UnmaskError("the tokenizer has no EOS token to end documents with")
    if options.dtype == "auto":
        dtype = token_dtype(encoder.vocab_size)
    else:
        dtype = np.dtype(options.dtype)
        if encoder.vocab_size > np.iinfo(dtype).max + 1:
            raise UnmaskError(f"dtype {dtype.name} cannot hold the ids of a {encoder.vocab_size}-token vocabulary")
    tok = {"hash": tokenizer_hash(encoder), "vocab_size": encoder.vocab_size, "eos_id": encoder.eos_id, "dir": None}
    root.mkdir(parents=True, exist_ok=True)
    spec: Any = encoder
    if hasattr(encoder, "save") and hasattr(encoder, "backend"):
        encoder.save(root / TOKENIZER_DIR)
        tok["dir"] = TOKENIZER_DIR
        spec = str(root / TOKENIZER_DIR)
    initargs = (spec, options.text_field, options.max_doc_bytes, dtype.name, True)
    old = _previous(root)
    old_tokens = {f["hash"]: f["tokens"] for f in old.get("files", []) if f.get("tokens")}

    with _Bars(options.progress) as bars, _worker_map(options.workers, initargs) as pmap:
        scan_tasks = _chunks([k for k in kinds if k[1] == "file"], lambda _: 1, SCAN_FILES, SCAN_FILES)
        scan_tasks += [[k] for k in kinds if k[1] != "file"]
        advance = bars.task("scan", len(kinds))
        docs: list[Doc] = []
        skips: list[tuple[str, int | None, str]] = []
        for (found_docs, found_skips), task in zip(pmap(_scan, scan_tasks), scan_tasks):
            docs += found_docs
            skips += found_skips
            advance(len(task))
        found = len(docs) + len(skips)

        docs.sort(key=lambda d: (d.digest, d.path, d.record or 0))
        unique: list[Doc] = []
        for doc in docs:
            if unique and unique[-1].digest == doc.digest:
                skips.append((doc.path, doc.record, DUPLICATE))
            else:
                unique.append(doc)
        skips.sort(key=lambda s: (s[0], s[1] or 0))
        train, val = split_documents(unique, options.val_fraction, options.max_files, digest=lambda d: d.digest)
        salt = f"{tok['hash']}:{dtype.name}"
        shards = plan_shards(train, "train", options.shard_bytes, salt) + plan_shards(val, "val", options.shard_bytes, salt)
        if not train:
            raise UnmaskError("no training documents: every file was skipped or held out for validation")
        todo = [s for s in shards if not _reuse(root, s, old, old_tokens)]
        planned = {s.file for s in shards}
        for stale in root.glob("*-[0-9][0-9][0-9][0-9][0-9].npy"):
            if stale.name not in planned and stale.name.split("-")[0] in SPLITS:
                stale.unlink()
        reused = len(shards) - len(todo)

        def record() -> dict[str, Any]:
            manifest = _manifest(sources, options, tok, dtype, shards, found, skips)
            if manifest != old:
                write_json_atomic(root / MANIFEST_NAME, manifest)
            return manifest

        manifest = record()
        tasks = [(s, chunk) for s in todo for chunk in _chunks(s.docs, lambda d: d.nbytes, CHUNK_BYTES, CHUNK_DOCS)]
        advance = bars.task("tokenise (KiB)", sum(d.nbytes for s in todo for d in s.docs) // 1024)
        parts: dict[str, list[np.ndarray | None]] = {s.name: [] for s in todo}
        remaining = Counter(s.name for s, _ in tasks)
        for (shard, chunk), arrays in zip(tasks, pmap(_encode, [c for _, c in tasks])):
            parts[shard.name] += arrays
            advance(sum(d.nbytes for d in chunk) // 1024)
            remaining[shard.name] -= 1
            if remaining[shard.name]:
                continue
            arrays = parts.pop(shard.name)
            kept = [a for a in arrays if a is not None]
            tokens = np.concatenate(kept) if kept else np.zeros(0, dtype=dtype)
            write_array_atomic(root / shard.file, tokens)
            shard.tokens = [0 if a is None else int(a.size) for a in arrays]
            shard.max_id = int(tokens.max()) if tokens.size else -1
            manifest = record()
    return BuildResult(root, manifest, len(todo), reused, time.perf_counter() - started)
