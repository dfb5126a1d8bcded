"""Input/target pair datasets (JSONL) for training and evaluating soft prompts, and a synthetic demo task."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import SoftPromptError

__all__ = ["CATEGORIES", "Example", "dataset_hash", "jsonl_objects", "load_pairs", "make_category_task", "save_pairs", "split"]


@dataclass(frozen=True)
class Example:
    input: str
    target: str


def _canonical_line(example: Example) -> str:
    return json.dumps({"input": example.input, "target": example.target}, ensure_ascii=False, sort_keys=True)


def jsonl_objects(path: Path, error: type[SoftPromptError] = SoftPromptError) -> Iterator[tuple[str, dict]]:
    """("file:line", object) for each non-blank line of a JSONL file; a line that is not a JSON object raises
    `error` naming its file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {path}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise error(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def load_pairs(path: str | Path) -> list[Example]:
    """Read a JSONL file whose non-blank lines are {"input": str, "target": str} (extra keys are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise SoftPromptError(f"dataset {str(path)!r} does not exist or is not a file")
    examples = []
    for where, record in jsonl_objects(path):
        for key in ("input", "target"):
            if key not in record:
                raise SoftPromptError(f"{where}: missing key {key!r}")
            if not isinstance(record[key], str):
                raise SoftPromptError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
        if not record["target"]:
            raise SoftPromptError(f"{where}: 'target' is empty")
        examples.append(Example(record["input"], record["target"]))
    if not examples:
        raise SoftPromptError(f"dataset {str(path)!r} has no examples")
    return examples


def save_pairs(examples: list[Example], path: str | Path) -> Path:
    """Write examples as JSONL (one canonical object per line); creates parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(_canonical_line(e) + "\n" for e in examples), encoding="utf-8")
    return path


def dataset_hash(examples: list[Example]) -> str:
    """sha256 (first 12 hex digits) of the canonical JSON lines: order- and content-sensitive, key-order-free."""
    h = hashlib.sha256()
    for example in examples:
        h.update(_canonical_line(example).encode("utf-8") + b"\n")
    return h.hexdigest()[:12]


CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruit": ("apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"),
    "animal": ("cat", "dog", "horse", "mouse", "tiger", "sheep", "goat", "wolf"),
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown"),
    "tool": ("hammer", "saw", "drill", "wrench", "chisel", "shovel", "axe", "pliers"),
}
_TEMPLATES = ("word: {} ->", "item: {} ->", "{} is a kind of:")


def make_category_task(n: int, seed: int = 0) -> list[Example]:
    """`n` deterministic examples like Example("word: apple ->", " fruit") from CATEGORIES.

    Every (word, template) pair appears once before any repeats; the order is shuffled by `seed`.
    """
    if n < 1:
        raise SoftPromptError(f"n must be >= 1, got {n}")
    pool = [Example(t.format(word), " " + category)
            for category, words in CATEGORIES.items() for word in words for t in _TEMPLATES]
    rng = random.Random(seed)
    out: list[Example] = []
    while len(out) < n:
        batch = pool[:]
        rng.shuffle(batch)
        out.extend(batch[: n - len(out)])
    return out


def split(examples: list[Example], validation_fraction: float = 0.2,
          seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Shuffle (by `seed`) and split into (train, validation); both are non-empty when there are >= 2 examples."""
    if not 0.0 <= validation_fraction < 1.0:
        raise SoftPromptError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = round(len(examples) * validation_fraction)
    if validation_fraction > 0 and len(examples) >= 2:
        n_val = min(max(n_val, 1), len(examples) - 1)
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    return train, val
