"""Prompts that server replicas load on demand by name: a shared prompt directory plus named startup sources.

A name from the network is checked against the registry's naming rules before it touches the file system, and
the path it resolves to must stay inside the prompt directory. Only safetensors files are ever read (a PEFT
adapter saved as adapter_model.bin is refused here: nothing from a shared directory is unpickled).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import PromptError, UnknownPromptError
from ..prompts import KV_PEFT_TYPES, split_task_suffix
from .registry import ADAPTER_FILES, check_public_name


@dataclass(frozen=True)
class PromptSource:
    """Where a prompt's content comes from: a PEFT adapter dir or .safetensors file, or a text."""

    name: str
    path: Path | None = None
    text: str | None = None
    task_id: int | None = None  # the task of a multitask prompt-tuning adapter (a start-up source DIR#N)

    def signature(self) -> tuple:
        """Changes when the content may have changed (files rewritten or replaced): (file, size, mtime) each."""
        if self.path is None:
            return ("text", self.text)
        files = [self.path / f for f in ADAPTER_FILES] if self.path.is_dir() else [self.path]
        try:
            return tuple((f.name, (s := f.stat()).st_size, s.st_mtime_ns, s.st_ino) for f in files)
        except FileNotFoundError as exc:
            raise UnknownPromptError(f"prompt {self.name!r} is no longer in the prompt directory") from exc

    def _adapter_config(self) -> dict:
        try:
            cfg = json.loads((self.path / "adapter_config.json").read_text())
        except (OSError, ValueError):
            return {}
        return cfg if isinstance(cfg, dict) else {}

    @property
    def length(self) -> int | None:
        """The number of virtual tokens a PEFT adapter declares (None when not cheaply known)."""
        if self.path is None or not self.path.is_dir():
            return None
        n = self._adapter_config().get("num_virtual_tokens")
        return n if isinstance(n, int) else None

    @property
    def kind(self) -> str:
        """As `SoftPrompt.kind`: "text", "tensor", "peft" or "prefix" (a PEFT prefix-tuning or cartridge adapter)."""
        if self.text is not None:
            return "text"
        if not self.path.is_dir():
            return "tensor"
        return "prefix" if self._adapter_config().get("peft_type") in KV_PEFT_TYPES else "peft"


class SharedPrompts:
    """name -> PromptSource: `texts` and `sources` given at start-up first, then `prompt_dir/<name>` (a PEFT
    adapter dir with adapter_model.safetensors) or `prompt_dir/<name>.safetensors`."""

    def __init__(self, prompt_dir: str | Path | None = None, sources: dict[str, str | Path] | None = None,
                 texts: dict[str, str] | None = None):
        self.prompt_dir = Path(prompt_dir).resolve() if prompt_dir is not None else None
        self.sources: dict[str, tuple[Path, int | None]] = {}
        for n, spec in (sources or {}).items():
            path, task_id = split_task_suffix(spec)
            self.sources[check_public_name(n)] = (path.resolve(), task_id)
        self.texts = {check_public_name(n): t for n, t in (texts or {}).items()}

    def find(self, name: str) -> PromptSource:
        """The source of `name`; raises UnknownPromptError (a 404) for anything that is not a servable prompt."""
        try:
            check_public_name(name)
        except PromptError as exc:
            raise UnknownPromptError(f"model {name!r} not found: {exc}") from exc
        if name in self.texts:
            return PromptSource(name, text=self.texts[name])
        if name in self.sources:
            path, task_id = self.sources[name]
            return PromptSource(name, path=path, task_id=task_id)
        if self.prompt_dir is not None:
            adapter_dir = self._inside(self.prompt_dir / name)
            if adapter_dir is not None and adapter_dir.is_dir() and (adapter_dir / "adapter_config.json").is_file():
                if not (adapter_dir / "adapter_model.safetensors").is_file():
                    raise PromptError(f"prompt {name!r} has no adapter_model.safetensors (pickle files are never "
                                      "loaded from the prompt directory: save with safe_serialization=True)")
                return PromptSource(name, path=adapter_dir)
            tensor_file = self._inside(self.prompt_dir / f"{name}.safetensors")
            if tensor_file is not None and tensor_file.is_file():
                return PromptSource(name, path=tensor_file)
        raise UnknownPromptError(f"model {name!r} not found (not a start-up prompt, and no adapter directory "
                                 "or .safetensors file of that name in the prompt directory)")

    def _inside(self, candidate: Path) -> Path | None:
        """The resolved path, unless it leads out of the prompt directory (a link pointing elsewhere)."""
        resolved = candidate.resolve()
        return resolved if resolved.is_relative_to(self.prompt_dir) and resolved != self.prompt_dir else None

    def names(self) -> list[str]:
        """Every name `find` would accept now, sorted (the prompt directory is scanned one level)."""
        found = set(self.texts) | set(self.sources)
        if self.prompt_dir is not None and self.prompt_dir.is_dir():
            for child in self.prompt_dir.iterdir():
                name = child.stem if child.suffix == ".safetensors" else child.name
                try:
                    self.find(name)
                except (PromptError, UnknownPromptError):
                    continue
                found.add(name)
        return sorted(found)
