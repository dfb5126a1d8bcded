"""Models and PEFT adapters named by their Hugging Face Hub id instead of a local path.

A source that exists on disk is used as it is. Otherwise a source that reads `org/name` (optionally
`org/name@revision`) is a Hub repository: huggingface_hub fetches its safetensors and JSON/tokenizer files into the
Hugging Face cache (or finds them there without a connection, `HF_HUB_OFFLINE=1`), and the engine reads that local
snapshot. Pickle files (`*.bin`, `*.pt`) are never fetched.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import CheckpointError, PromptError

HUB_ID_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<revision>[\w./-]{1,200}))?$")
# `SOURCE#N`: task N of a multitask prompt-tuning adapter (a local directory's or a Hub id's)
TASK_SUFFIX_RE = re.compile(r"^(?P<path>.+)#(?P<task>\d{1,6})$")
# config/generation/tokenizer JSON, the safetensors weights (sharded or not; not Mistral's extra consolidated.*),
# SentencePiece / tiktoken vocabularies, merges/vocab text files and chat templates
MODEL_FILES = ["*.json", "model*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def _exists(text: str) -> bool:
    try:
        return Path(text).expanduser().exists()
    except OSError:  # e.g. a name too long for the file system: no path
        return False


def hub_id(source: str | Path) -> tuple[str, str | None] | None:
    """(repo id, revision or None) where `source` is no existing path and reads `org/name[@revision]`; else None."""
    text = str(source)
    if _exists(text):
        return None
    match = HUB_ID_RE.match(text)
    if match is None or any(part in (".", "..") or part.endswith(".") for part in match["repo"].split("/")):
        return None
    return match["repo"], match["revision"]


def _split_task(text: str) -> tuple[str, str | None]:
    """`SOURCE#N` -> (SOURCE, "N"); anything else -> (text, None)."""
    match = TASK_SUFFIX_RE.match(text)
    return (match["path"], match["task"]) if match else (text, None)


def _fetch(repo: str, revision: str | None, patterns: list[str], error: type[Exception]) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # huggingface_hub raises many types: offline, not found, gated, connection errors
        at = f" at revision {revision!r}" if revision else ""
        raise error(f"{repo!r} is no local path, and fetching it from the Hugging Face Hub{at} failed: "
                    f"{type(exc).__name__}: {exc}") from exc


def resolve_model(source: str | Path, revision: str | None = None) -> Path:
    """The local checkpoint directory of `source`: a directory as given, or the snapshot of a Hub model id."""
    found = hub_id(source)
    if found is None:
        if revision is not None:
            raise CheckpointError(f"revision={revision!r} picks a version of a Hub model id, but {str(source)!r} "
                                  "is a local path (or no Hub id)")
        return Path(source)
    repo, pinned = found
    if pinned is not None and revision is not None and pinned != revision:
        raise CheckpointError(f"{str(source)!r} names revision {pinned!r} but revision={revision!r}")
    local = _fetch(repo, pinned or revision, MODEL_FILES, CheckpointError)
    if not any(local.glob("model*.safetensors")):
        raise CheckpointError(f"Hub model {repo!r} has no safetensors weights (model.safetensors or its shards); "
                              "pickle weights (*.bin) are never fetched: use a repo with safetensors")
    return local


def resolve_prompt_source(source: str | Path) -> Path:
    """The local path of a prompt source: a path as given (with its `#N` task suffix), or the snapshot of a Hub
    PEFT adapter id `org/name[@revision][#N]` (its adapter_config.json and adapter_model.safetensors)."""
    text = str(source)
    if _exists(text):
        return Path(text)
    base, task = _split_task(text)
    found = hub_id(base)
    if found is None:
        return Path(text)
    local = _fetch(*found, ADAPTER_FILES, PromptError)
    missing = [name for name in ADAPTER_FILES if not (local / name).is_file()]
    if missing:
        raise PromptError(f"Hub repo {found[0]!r} is no PEFT adapter the engine reads: it lacks {', '.join(missing)} "
                          "(pickle adapter_model.bin files are never fetched: save it with safe_serialization=True)")
    return local if task is None else Path(f"{local}#{task}")


def hub_prompt_name(source: str | Path) -> str | None:
    """A prompt name for a Hub adapter id (its repo's name, `-taskN` for `#N`), or None for anything else."""
    base, task = _split_task(str(source))
    found = hub_id(base)
    if found is None:
        return None
    name = found[0].split("/")[1]
    return name if task is None else f"{name}-task{task}"
