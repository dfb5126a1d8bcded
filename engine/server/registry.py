"""The live prompt registry: public names with numbered versions over the engine's prompt store.

Every version is registered in the engine under its own internal name `name.v<N>`, so `name@N` stays
addressable after `name` moves on; `name` alone means the latest version. Uploaded files are written under the
server's prompt directory with fixed file names (the client's file names only tell what was sent), validated by
`engine.add_prompt` exactly as the library validates, and deleted again when that fails.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..api import Engine
from ..errors import PromptError, UnknownPromptError
from ..prompts import check_prompt_name
from .engine_loop import EngineLoop

BASE_MODEL = "base"  # the model without a prompt
MAX_NAME_LENGTH = 100
_VERSION_SUFFIX = re.compile(r"\.v\d+$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
IGNORED_UPLOADS = frozenset({"README.md"})  # PEFT's save_pretrained writes one beside the adapter


@dataclass(frozen=True)
class PromptVersion:
    name: str
    version: int
    engine_name: str  # the name in the engine's prompt store
    content_hash: str  # the engine's content version
    length: int
    kind: str
    created: int
    path: Path | None = None  # uploaded files the registry owns (removed with the version)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def describe(self) -> dict:
        return {"id": self.ref, "object": "prompt", "name": self.name, "version": self.version,
                "content_hash": self.content_hash, "length": self.length, "kind": self.kind, "created": self.created}


def check_public_name(name: object) -> str:
    """The engine's naming rules, plus: short enough for a version suffix, and not looking like one."""
    check_prompt_name(name)
    if len(name) > MAX_NAME_LENGTH:
        raise PromptError(f"prompt name {name[:20]!r}... is longer than {MAX_NAME_LENGTH} characters")
    if _VERSION_SUFFIX.search(name):
        raise PromptError(f"prompt name {name!r} must not end in '.v<digits>' (reserved for versions)")
    return name


def _as_public(exc: PromptError, engine_name: str, name: str, staged: Path | None = None) -> PromptError:
    """The engine's error naming the prompt as the client did, and showing no server paths."""
    message = str(exc).replace(repr(engine_name), repr(name))
    if staged is not None:
        message = message.replace(str(staged), "<upload>")
    return PromptError(message)


class PromptRegistry:
    def __init__(self, prompt_dir: str | Path | None = None, max_versions: int = 8):
        if max_versions < 1:
            raise ValueError("max_versions must be >= 1")
        self._owns_dir = prompt_dir is None
        root = Path(tempfile.mkdtemp(prefix="softprompt-prompts-")) if prompt_dir is None else Path(prompt_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.prompt_dir = root.resolve()
        self.max_versions = max_versions
        self._versions: dict[str, dict[int, PromptVersion]] = {}
        self._next_version: dict[str, int] = {}  # never reused, so engine names never repeat
        self._lock = threading.Lock()

    # ---- lookup ---------------------------------------------------------------------------------------
    def get(self, ref: str) -> PromptVersion:
        """`name` (latest), `name@N` or `name@<content hash>`; raises UnknownPromptError."""
        name, _, wanted = ref.partition("@")
        with self._lock:
            versions = self._versions.get(name)
            if versions:
                if not wanted or wanted == "latest":
                    return versions[max(versions)]
                if wanted.isdigit() and int(wanted) in versions:
                    return versions[int(wanted)]
                for pv in versions.values():
                    if pv.content_hash == wanted:
                        return pv
                raise UnknownPromptError(f"prompt {name!r} has no version {wanted!r} (versions: "
                                         f"{', '.join(str(v) for v in sorted(versions))})")
            known = ", ".join([BASE_MODEL, *sorted(self._versions)])
        raise UnknownPromptError(f"model {ref!r} not found (known: {known})")

    def resolve(self, model: str) -> str | None:
        """The engine prompt name for a request's `model` (None: the base model)."""
        return None if model == BASE_MODEL else self.get(model).engine_name

    def latest(self) -> list[PromptVersion]:
        with self._lock:
            return [v[max(v)] for _, v in sorted(self._versions.items())]

    def versions(self, name: str) -> list[PromptVersion]:
        with self._lock:
            return [pv for _, pv in sorted(self._versions.get(name, {}).items())]

    # ---- changes --------------------------------------------------------------------------------------
    def _reserve(self, name: str) -> int:
        check_public_name(name)
        with self._lock:
            version = self._next_version.get(name, 1)
            self._next_version[name] = version + 1
        return version

    def _record(self, name: str, version: int, prompt, path: Path | None) -> tuple[PromptVersion, list[PromptVersion]]:
        pv = PromptVersion(name, version, prompt.name, prompt.version, prompt.length, prompt.kind,
                           int(time.time()), path)
        with self._lock:
            versions = self._versions.setdefault(name, {})
            versions[version] = pv
            old = sorted(versions)[: max(0, len(versions) - self.max_versions)]
            dropped = [versions.pop(v) for v in old]
        return pv, dropped

    def register(self, engine: Engine, name: str, source=None, *, text: str | None = None,
                 task_id: int | None = None) -> PromptVersion:
        """Register directly on the engine: only before the engine loop starts (startup prompts)."""
        version = self._reserve(name)
        try:
            prompt = engine.add_prompt(f"{name}.v{version}", source, text=text, task_id=task_id)
        except PromptError as exc:
            raise _as_public(exc, f"{name}.v{version}", name) from exc
        pv, dropped = self._record(name, version, prompt, None)
        for old in dropped:
            engine.remove_prompt(old.engine_name)
        return pv

    async def add(self, loop: EngineLoop, name: str, source: Path | None = None, *, text: str | None = None,
                  token_ids: list[int] | None = None, staged: Path | None = None,
                  task_id: int | None = None) -> PromptVersion:
        """Validate and register a new version through the engine loop. `staged`: uploaded files to keep
        (moved under prompt_dir/name/vN-<id> on success, deleted on failure). `task_id`: the task of a multitask
        prompt-tuning adapter."""
        version, engine_name = None, None
        try:
            version = self._reserve(name)
            engine_name = f"{name}.v{version}"
            prompt = await loop.run(lambda e: e.add_prompt(engine_name, source, text=text, token_ids=token_ids,
                                                           task_id=task_id))
        except BaseException as exc:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
            if version is not None and isinstance(exc, ValueError):
                with self._lock:  # the engine refused it (and changed nothing): the number is free again
                    if self._next_version.get(name) == version + 1:
                        self._next_version[name] = version
            if isinstance(exc, PromptError) and engine_name is not None:
                raise _as_public(exc, engine_name, name, staged) from exc
            raise
        path = None
        if staged is not None:
            try:
                path = self._version_dir(name, version)
                path.parent.mkdir(parents=True, exist_ok=True)
                staged.rename(path)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                await loop.run(lambda e: e.remove_prompt(engine_name))
                raise
        pv, dropped = self._record(name, version, prompt, path)
        for old in dropped:
            await self._unregister(loop, old)
        return pv

    async def remove(self, loop: EngineLoop, ref: str) -> list[PromptVersion]:
        """Remove `name` (every version) or `name@N`. New requests are refused at once; running ones finish."""
        target = self.get(ref)
        with self._lock:
            versions = self._versions.get(target.name, {})
            removed = list(versions.values()) if "@" not in ref else [versions.pop(target.version)]
            if "@" not in ref or not versions:
                self._versions.pop(target.name, None)
        for pv in removed:
            await self._unregister(loop, pv)
        return removed

    async def _unregister(self, loop: EngineLoop, pv: PromptVersion) -> None:
        def drop(engine: Engine) -> None:
            if pv.engine_name in engine.prompts:
                engine.remove_prompt(pv.engine_name)

        await loop.run(drop)
        if pv.path is not None and self._inside(pv.path):
            shutil.rmtree(pv.path, ignore_errors=True)

    # ---- files ----------------------------------------------------------------------------------------
    def _inside(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.prompt_dir) and path.resolve() != self.prompt_dir

    def _version_dir(self, name: str, version: int) -> Path:
        # a unique suffix: a prompt directory reused by a later server run may hold older files
        path = self.prompt_dir / check_public_name(name) / f"v{version}-{uuid.uuid4().hex[:8]}"
        if not self._inside(path) or path.resolve().parent.parent != self.prompt_dir:
            raise PromptError(f"prompt name {name!r} does not stay inside the prompt directory")
        return path

    def stage_files(self, files: list[tuple[str, bytes]]) -> tuple[Path, Path]:
        """Write uploaded files under fixed names in a fresh staging directory; returns (engine source, staged
        directory). A PEFT adapter is adapter_config.json + adapter_model.safetensors; a tensor is one
        .safetensors file. Pickle files (adapter_model.bin, *.pt) are refused: nothing is ever unpickled."""
        named = [(PurePosixPath(filename.replace("\\", "/")).name, data) for filename, data in files]
        kept = [(n, d) for n, d in named if n not in IGNORED_UPLOADS]
        names = sorted(n for n, _ in kept)
        if names == sorted(ADAPTER_FILES):
            layout = {n: n for n in ADAPTER_FILES}
        elif len(kept) == 1 and names[0].endswith(".safetensors"):
            layout = {names[0]: "prompt.safetensors"}
        else:
            raise PromptError(
                "upload a PEFT prompt-learning adapter (adapter_config.json + adapter_model.safetensors: prompt "
                "tuning, P-tuning, CPT, multitask prompt tuning, prefix tuning or a cartridge) or one .safetensors "
                "tensor file; "
                f"got {names or 'no files'} (pickle files are never loaded)"
            )
        staged = self.prompt_dir / ".staging" / uuid.uuid4().hex
        staged.mkdir(parents=True)
        for n, data in kept:
            (staged / layout[n]).write_bytes(data)
        source = staged if len(layout) == 2 else staged / "prompt.safetensors"
        return source, staged

    def close(self) -> None:
        """Remove the prompt directory if the registry created it."""
        if self._owns_dir:
            shutil.rmtree(self.prompt_dir, ignore_errors=True)
        else:
            shutil.rmtree(self.prompt_dir / ".staging", ignore_errors=True)
