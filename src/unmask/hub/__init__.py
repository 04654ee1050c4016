"""The model cache: naming models, listing them, pulling them from the Hugging Face Hub.

- ``cache``: the layout (``$UNMASK_HOME/models/<org>--<name>/`` with its pull record), ids and revisions;
- ``names``: ``resolve_model``, what a name after ``--model`` means (a path, ``default`` /
  ``default-ar``, a ``PACKAGED`` model, a cached ``org/name``);
- ``listing``: ``unmask list``'s facts, read from configs and weight headers without loading;
- ``display``: sizes, counts and the table;
- ``pulling``: ``unmask pull``, safe files only, bounded by a timeout.
"""

from unmask.hub.cache import (
    PARTIAL_SUFFIX,
    RECORD_NAME,
    STALE_SUFFIX,
    cache_dir,
    check_repo_id,
    check_revision,
    model_path,
)
from unmask.hub.display import human_count, human_size, print_models
from unmask.hub.listing import ModelEntry, count_parameters, describe, describe_gguf, entries_json, list_models
from unmask.hub.names import DEFAULT_NAME, PACKAGED, SHIPPED_NAMES, Packaged, packaged_path, resolve_model
from unmask.hub.pulling import DEFAULT_TIMEOUT, REFUSED_PATTERNS, SAFE_PATTERNS, pull, safe_files

__all__ = [
    "DEFAULT_NAME", "DEFAULT_TIMEOUT", "PACKAGED", "PARTIAL_SUFFIX", "RECORD_NAME", "REFUSED_PATTERNS",
    "SAFE_PATTERNS", "SHIPPED_NAMES", "STALE_SUFFIX", "ModelEntry", "Packaged", "cache_dir", "check_repo_id",
    "check_revision", "count_parameters", "describe", "describe_gguf", "entries_json", "human_count", "human_size",
    "list_models", "model_path", "packaged_path", "print_models", "pull", "resolve_model", "safe_files",
]
