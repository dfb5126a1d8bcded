"""The soft-prompt store: load, validate and version the prefixes that define tasks."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import read_json_object
from .errors import PromptError, UnknownPromptError
from .hub import TASK_SUFFIX_RE, resolve_prompt_source

PROMPT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
RESERVED_NAMES = frozenset({"base"})  # "base" addresses the model without a prompt
PEFT_WEIGHTS_KEY = "prompt_embeddings"
# PEFT prompt-learning methods whose saved weights are input-embedding rows, used as-is at inference (P-tuning
# saves its prompt encoder's output, CPT its embedding plus projected delta), multitask prompt tuning, whose rows
# are scaled per task by a low-rank matrix, and the methods whose weights are every layer's K/V of the virtual
# tokens (prefix tuning; cartridges, in the same layout)
ROW_PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING", "CPT")
MULTITASK_PEFT_TYPE = "MULTITASK_PROMPT_TUNING"
KV_PEFT_TYPES = ("PREFIX_TUNING", "CARTRIDGE")
SUPPORTED_PEFT_TYPES = (*ROW_PEFT_TYPES, MULTITASK_PEFT_TYPE, *KV_PEFT_TYPES)


@dataclass(frozen=True)
class SoftPrompt:
    """A task's prefix, cast to the model dtype once, on the model device: P rows of input embeddings, or (a PEFT
    prefix-tuning adapter) the K/V of P virtual tokens at every layer, which the engine stores as they are."""

    name: str
    embeds: torch.Tensor | None  # [P, hidden]; None for a prefix-tuning adapter
    version: str  # content hash: changes whenever the rows (or K/V) change
    kind: str  # "peft" | "tensor" | "text" | "prefix" (PEFT prefix tuning or cartridge: K/V)
    token_ids: tuple[int, ...] | None = None  # for text (hard) prompts: the rows are these tokens' embeddings
    source: str | None = None
    kv: torch.Tensor | None = None  # [layers, 2, P, kv_heads, head_dim] (keys not rotated), prefix tuning only

    @property
    def length(self) -> int:
        return int(self.embeds.shape[0] if self.embeds is not None else self.kv.shape[2])

    @property
    def reference_input(self) -> torch.Tensor:
        """What the reference path prepends: the rows [P, hidden], or the per-layer K/V [L, 2, P, H, D]."""
        return self.embeds if self.embeds is not None else self.kv

    @property
    def key(self) -> str:
        """Cache key: name and version."""
        return f"{self.name}@{self.version}"


def tokens_as_input_ids(prompt: SoftPrompt | None) -> bool:
    """Whether a request's tokens reach the model as input ids (no prompt, or a text prompt, whose tokens are input
    too) rather than as inputs_embeds after PEFT's prompt rows: a model that scales the embeddings of its input ids
    (Falcon-H1's token_embedding_multiplier) scales only the former, as transformers + PEFT do."""
    return prompt is None or prompt.kind == "text"


def content_version(embeds: torch.Tensor) -> str:
    data = embeds.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{data.dtype}:{tuple(data.shape)}:".encode())
    h.update(data.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def check_prompt_name(name: object) -> str:
    if not isinstance(name, str) or not PROMPT_NAME_RE.match(name):
        raise PromptError(
            f"invalid prompt name {name!r}: use 1-128 characters from letters, digits, '.', '_', '-', "
            "starting with a letter or digit"
        )
    if name in RESERVED_NAMES:
        raise PromptError(f"prompt name {name!r} is reserved (it means 'no prompt')")
    return name


@dataclass(frozen=True)
class PeftPromptWeights:
    """What a PEFT prompt-learning adapter holds: `weights` [P, hidden] rows (prompt tuning, P-tuning, CPT, one
    task of multitask prompt tuning), or for prefix tuning and cartridges [P, layers * 2 * kv_heads * head_dim]
    (per virtual token: layer 0's K then V, layer 1's, ...)."""

    peft_type: str
    weights: torch.Tensor
    config: dict

    @property
    def is_kv(self) -> bool:
        return self.peft_type in KV_PEFT_TYPES

    @property
    def length(self) -> int:
        return int(self.weights.shape[-2])


def split_task_suffix(source: str | Path) -> tuple[Path, int | None]:
    """`DIR#N` -> (DIR, N): task N of a multitask prompt-tuning adapter; anything else -> (path, None). A path
    that exists as written is never split."""
    path = Path(source)
    match = TASK_SUFFIX_RE.match(str(source))
    if match is None or path.exists():
        return path, None
    return Path(match["path"]), int(match["task"])


def read_peft_config(adapter_dir: Path) -> dict:
    """A PEFT adapter directory's adapter_config.json."""
    config_path = Path(adapter_dir) / "adapter_config.json"
    if not config_path.is_file():
        raise PromptError(f"{adapter_dir} is not a PEFT adapter directory: adapter_config.json is missing")
    return read_json_object(config_path, PromptError)


def read_peft_adapter(adapter_dir: Path, task_id: int | None = None) -> PeftPromptWeights:
    """The weights of a PEFT prompt-learning adapter directory, after checking its config. `task_id` picks the
    task of a multitask prompt-tuning adapter (default 0 when it holds one task)."""
    cfg = read_peft_config(adapter_dir)
    peft_type = cfg.get("peft_type")
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise PromptError(
            f"{adapter_dir}: peft_type is {peft_type!r}; this engine serves PEFT prompt-learning adapters of "
            f"types {', '.join(SUPPORTED_PEFT_TYPES)}"
        )
    if task_id is not None and peft_type != MULTITASK_PEFT_TYPE:
        raise PromptError(f"{adapter_dir}: a task id (#{task_id}) selects a task of a {MULTITASK_PEFT_TYPE} adapter; "
                          f"this one is {peft_type}")
    task_type = cfg.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        raise PromptError(f"{adapter_dir}: task_type is {task_type!r}; this engine serves CAUSAL_LM prompts")
    submodules = cfg.get("num_transformer_submodules") or 1
    if submodules != 1:
        raise PromptError(f"{adapter_dir}: num_transformer_submodules={submodules}; a decoder-only model has 1")

    safetensors_path = adapter_dir / "adapter_model.safetensors"
    bin_path = adapter_dir / "adapter_model.bin"
    if safetensors_path.is_file():
        try:
            weights = load_file(str(safetensors_path))
        except (SafetensorError, OSError) as exc:
            raise PromptError(f"cannot read {safetensors_path}: {exc}") from exc
    elif bin_path.is_file():
        # torch's weights_only loader refuses any object that is not a tensor or plain container:
        # nothing arbitrary is ever unpickled.
        try:
            weights = torch.load(str(bin_path), map_location="cpu", weights_only=True)
        except Exception as exc:  # the restricted unpickler raises UnpicklingError, RuntimeError, ...
            raise PromptError(f"refusing {bin_path}: it cannot be read as plain tensors ({exc})") from exc
    else:
        raise PromptError(f"{adapter_dir} has no adapter_model.safetensors (or adapter_model.bin)")
    if not isinstance(weights, dict) or PEFT_WEIGHTS_KEY not in weights:
        keys = list(weights)[:5] if isinstance(weights, dict) else type(weights).__name__
        raise PromptError(f"{adapter_dir}: adapter weights have no {PEFT_WEIGHTS_KEY!r} entry (found {keys})")
    embeds = weights[PEFT_WEIGHTS_KEY]
    if not isinstance(embeds, torch.Tensor):
        raise PromptError(f"{adapter_dir}: {PEFT_WEIGHTS_KEY!r} is not a tensor")
    expected_rows = cfg.get("num_virtual_tokens")
    if embeds.dim() == 2 and expected_rows is not None and embeds.shape[0] != expected_rows * submodules:
        raise PromptError(
            f"{adapter_dir}: num_virtual_tokens={expected_rows} in adapter_config.json but the weights have "
            f"{embeds.shape[0]} rows"
        )
    token_dim = cfg.get("token_dim")
    if peft_type == MULTITASK_PEFT_TYPE:
        embeds = _multitask_rows(adapter_dir, cfg, weights, embeds, task_id)
    if peft_type in KV_PEFT_TYPES:
        layers = cfg.get("num_layers")
        width = None if token_dim is None or layers is None else 2 * layers * token_dim
        if embeds.dim() == 2 and width is not None and embeds.shape[1] != width:
            raise PromptError(
                f"{adapter_dir}: num_layers={layers} and token_dim={token_dim} give rows of width {width} (K and V "
                f"of every layer), but the weights have width {embeds.shape[1]}"
            )
    elif embeds.dim() == 2 and token_dim is not None and embeds.shape[1] != token_dim:
        raise PromptError(f"{adapter_dir}: token_dim={token_dim} but the weights have width {embeds.shape[1]}")
    return PeftPromptWeights(peft_type, embeds, cfg)


def _multitask_rows(adapter_dir: Path, cfg: dict, weights: dict, shared: torch.Tensor,
                    task_id: int | None) -> torch.Tensor:
    """Task `task_id`'s rows of a multitask prompt-tuning adapter, as PEFT computes them at inference: the shared
    rows [P, hidden] times the task's rank-r matrix cols[t] @ rows[t] ([P, r] @ [r, hidden]), in float32."""
    cols, rows = weights.get("prefix_task_cols"), weights.get("prefix_task_rows")
    if not isinstance(cols, torch.Tensor) or not isinstance(rows, torch.Tensor):
        raise PromptError(f"{adapter_dir}: a {MULTITASK_PEFT_TYPE} adapter needs prefix_task_cols and "
                          "prefix_task_rows tensors")
    if shared.dim() != 2 or cols.dim() != 3 or rows.dim() != 3 or cols.shape[0] != rows.shape[0] \
            or cols.shape[1:] != (shared.shape[0], rows.shape[1]) or rows.shape[2] != shared.shape[1]:
        raise PromptError(
            f"{adapter_dir}: {MULTITASK_PEFT_TYPE} shapes do not fit: prompt_embeddings {tuple(shared.shape)}, "
            f"prefix_task_cols {tuple(cols.shape)} (tasks, P, rank), prefix_task_rows {tuple(rows.shape)} "
            "(tasks, rank, hidden)"
        )
    num_tasks = int(cols.shape[0])
    if task_id is None:
        if num_tasks != 1:
            raise PromptError(f"{adapter_dir} is a {MULTITASK_PEFT_TYPE} adapter of {num_tasks} tasks: pick one "
                              f"with task_id (0..{num_tasks - 1}), or DIR#N in a path")
        task_id = 0
    if not isinstance(task_id, int) or isinstance(task_id, bool) or not 0 <= task_id < num_tasks:
        raise PromptError(f"{adapter_dir}: task_id {task_id!r} is not one of the adapter's {num_tasks} tasks "
                          f"(0..{num_tasks - 1})")
    if not (shared.is_floating_point() and cols.is_floating_point() and rows.is_floating_point()):
        raise PromptError(f"{adapter_dir}: {MULTITASK_PEFT_TYPE} weights must be floating point")
    return shared.float() * (cols[task_id].float() @ rows[task_id].float())


def read_tensor_file(path: Path) -> torch.Tensor:
    if path.suffix != ".safetensors":
        raise PromptError(f"{path}: prompt files must be .safetensors (pickle formats are never loaded)")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise PromptError(f"cannot read {path}: {exc}") from exc
    if PEFT_WEIGHTS_KEY in weights:
        return weights[PEFT_WEIGHTS_KEY]
    if len(weights) != 1:
        raise PromptError(f"{path} holds {len(weights)} tensors; store one, or name it {PEFT_WEIGHTS_KEY!r}")
    return next(iter(weights.values()))


class PromptStore:
    """Named soft prompts for one model. A rejected prompt leaves the store unchanged."""

    def __init__(
        self,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        max_length: int,
        vocab_size: int,
        embed_tokens: Callable[[torch.Tensor], torch.Tensor],
        tokenize: Callable[[str], list[int]] | None = None,
        kv_layout: tuple[int, int, int] | None = None,
        key_channel_order: list[int] | None = None,
        kv_refusal: str | None = None,
    ):
        """kv_layout: the model's (layers, kv_heads, head_dim), what a prefix-tuning adapter's K/V must match (None:
        such adapters are refused, for the reason `kv_refusal` gives); key_channel_order: how the model permutes each
        head's key channels (`ModelConfig.key_channel_order`)."""
        self.hidden_size = hidden_size
        self.kv_layout = kv_layout
        self.kv_refusal = kv_refusal
        self.key_channel_order = key_channel_order
        self.dtype = dtype
        self.device = device
        self.max_length = max_length
        self.vocab_size = vocab_size
        self._embed_tokens = embed_tokens
        self._tokenize = tokenize
        self._prompts: dict[str, SoftPrompt] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._prompts

    def __len__(self) -> int:
        return len(self._prompts)

    def names(self) -> list[str]:
        return list(self._prompts)

    def get(self, name: str) -> SoftPrompt:
        try:
            return self._prompts[name]
        except (KeyError, TypeError):
            known = ", ".join(sorted(self._prompts)) or "none registered"
            raise UnknownPromptError(f"unknown prompt {name!r} (known: {known})") from None

    def restore(self, name: str, prompt: SoftPrompt | None) -> None:
        """Put back what `name` was before a registration that must be undone (None: it did not exist)."""
        if prompt is None:
            self._prompts.pop(name, None)
        else:
            self._prompts[name] = prompt

    def remove(self, name: str) -> SoftPrompt:
        prompt = self.get(name)
        del self._prompts[name]
        return prompt

    def add(
        self,
        name: str,
        source: str | Path | torch.Tensor | None = None,
        *,
        text: str | None = None,
        token_ids: list[int] | None = None,
        replace: bool = False,
        task_id: int | None = None,
    ) -> SoftPrompt:
        """Register a prompt from a PEFT adapter dir, a .safetensors file, a [P, hidden] tensor, text or token ids.
        `task_id` (or a path written `DIR#N`) picks the task of a multitask prompt-tuning adapter."""
        check_prompt_name(name)
        if name in self._prompts and not replace:
            raise PromptError(f"prompt name {name!r} is already taken (pass replace=True to register a new version)")
        given = [x is not None for x in (source, text, token_ids)]
        if sum(given) != 1:
            raise PromptError("give exactly one of: source (adapter dir, .safetensors file or tensor), text, token_ids")
        if task_id is not None and source is None:
            raise PromptError("task_id selects a task of a multitask prompt-tuning adapter: give its directory")
        if text is not None or token_ids is not None:
            prompt = self._from_tokens(name, text, token_ids)
        else:
            kind, weights, origin = self._read_source(source, task_id)
            if isinstance(weights, PeftPromptWeights) and weights.is_kv:
                kv = self._validate_kv(name, weights)
                prompt = SoftPrompt(name, None, content_version(kv), "prefix", None, origin, kv)
            else:
                if isinstance(weights, PeftPromptWeights):
                    weights = weights.weights
                embeds = self._validate(name, weights)
                prompt = SoftPrompt(name, embeds, content_version(embeds), kind, None, origin)
        self._prompts[name] = prompt
        return prompt

    def _read_source(
        self, source: str | Path | torch.Tensor, task_id: int | None = None
    ) -> tuple[str, torch.Tensor | PeftPromptWeights, str | None]:
        if isinstance(source, torch.Tensor):
            if task_id is not None:
                raise PromptError("task_id selects a task of a multitask prompt-tuning adapter, not of a tensor")
            return "tensor", source, None
        if not isinstance(source, (str, Path)):
            raise PromptError(f"unsupported prompt source of type {type(source).__name__}")
        try:
            return self._read_path(source, task_id)
        except OSError as exc:  # a name too long for the file system, a directory that cannot be listed, ...
            raise PromptError(f"prompt source {str(source)[:200]!r} cannot be read: {exc.strerror or exc}") from exc

    def _read_path(self, source: str | Path, task_id: int | None) -> tuple[str, torch.Tensor | PeftPromptWeights, str]:
        path, suffix_task = split_task_suffix(resolve_prompt_source(source))
        if suffix_task is not None:
            if task_id is not None and task_id != suffix_task:
                raise PromptError(f"prompt source {str(source)!r} names task {suffix_task} but task_id={task_id}")
            task_id = suffix_task
        if path.is_dir():
            origin = str(path) if task_id is None else f"{path}#{task_id}"
            return "peft", read_peft_adapter(path, task_id), origin
        if task_id is not None and path.exists():
            raise PromptError(f"{path}: a task id selects a task of a multitask prompt-tuning adapter directory")
        if path.is_file():
            return "tensor", read_tensor_file(path), str(path)
        raise PromptError(f"prompt source {str(source)!r} does not exist (for a text prompt pass text=...)")

    def _from_tokens(self, name: str, text: str | None, token_ids: list[int] | None) -> SoftPrompt:
        if text is not None:
            if not isinstance(text, str) or not text:
                raise PromptError(f"text prompt {name!r} is empty")
            if self._tokenize is None:
                raise PromptError(f"text prompt {name!r} needs a tokenizer; the model directory has none")
            token_ids = self._tokenize(text)
        ids = list(token_ids or [])
        if not ids:
            raise PromptError(f"prompt {name!r} has no tokens")
        if any(not isinstance(i, int) or not 0 <= i < self.vocab_size for i in ids):
            raise PromptError(f"prompt {name!r} has token ids outside the vocabulary")
        with torch.no_grad():
            embeds = self._embed_tokens(torch.tensor(ids, device=self.device))
        embeds = self._validate(name, embeds)
        return SoftPrompt(name, embeds, content_version(embeds), "text", tuple(ids), text)

    def _validate(self, name: str, embeds: torch.Tensor) -> torch.Tensor:
        if embeds.dim() == 3 and embeds.shape[0] == 1:
            embeds = embeds[0]
        if embeds.dim() != 2:
            raise PromptError(f"prompt {name!r} must be a [num_virtual_tokens, hidden] matrix, got {tuple(embeds.shape)}")
        if not embeds.is_floating_point():
            raise PromptError(f"prompt {name!r} has non-float dtype {embeds.dtype}")
        rows, width = embeds.shape
        if rows == 0:
            raise PromptError(f"prompt {name!r} is empty (0 virtual tokens)")
        if width != self.hidden_size:
            raise PromptError(f"prompt {name!r} has hidden size {width}, the model's is {self.hidden_size}")
        if rows >= self.max_length:
            raise PromptError(
                f"prompt {name!r} has {rows} virtual tokens, leaving no room in the model's {self.max_length} positions"
            )
        return self._cast(name, embeds)

    def _cast(self, name: str, weights: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(weights).all():
            raise PromptError(f"prompt {name!r} contains NaN or Inf")
        cast = weights.detach().to(device=self.device, dtype=self.dtype).contiguous()
        if not torch.isfinite(cast).all():
            raise PromptError(f"prompt {name!r} overflows {self.dtype} (values too large)")
        return cast

    def _validate_kv(self, name: str, adapter: PeftPromptWeights) -> torch.Tensor:
        """A prefix-tuning adapter's rows as K/V [layers, 2, P, kv_heads, head_dim] in the model dtype, after
        checking they fit the model (PEFT stores each virtual token's K and V of layer 0, then layer 1, ...)."""
        if self.kv_layout is None:
            raise PromptError(f"prompt {name!r} is a prefix-tuning (K/V) adapter: "
                              f"{self.kv_refusal or 'this prompt store cannot hold one'}")
        layers, heads, head_dim = self.kv_layout
        flat = adapter.weights
        if flat.dim() == 3 and flat.shape[0] == 1:
            flat = flat[0]
        if flat.dim() != 2 or not flat.is_floating_point():
            raise PromptError(f"prompt {name!r}: prefix-tuning weights must be a float [num_virtual_tokens, "
                              f"layers * 2 * kv_heads * head_dim] matrix, got {flat.dtype} {tuple(flat.shape)}")
        cfg = adapter.config
        if cfg.get("num_layers") not in (None, layers):
            raise PromptError(f"prompt {name!r} is a prefix-tuning adapter for a model of {cfg['num_layers']} "
                              f"layers; this model has {layers}")
        if cfg.get("num_attention_heads") not in (None, heads):
            raise PromptError(f"prompt {name!r} is a prefix-tuning adapter with {cfg['num_attention_heads']} key/"
                              f"value heads; this model has {heads}")
        rows, width = flat.shape
        if width != layers * 2 * heads * head_dim:
            raise PromptError(
                f"prompt {name!r}: prefix-tuning rows of width {width}, but this model's K and V at every layer "
                f"take {layers} * 2 * {heads} * {head_dim} = {layers * 2 * heads * head_dim}"
            )
        if rows == 0:
            raise PromptError(f"prompt {name!r} is empty (0 virtual tokens)")
        if rows >= self.max_length:
            raise PromptError(
                f"prompt {name!r} has {rows} virtual tokens, leaving no room in the model's {self.max_length} positions"
            )
        cast = self._cast(name, flat)
        kv = cast.view(rows, layers, 2, heads, head_dim).permute(1, 2, 0, 3, 4).contiguous()
        if self.key_channel_order is not None:
            kv[:, 0] = kv[:, 0, ..., self.key_channel_order]
        return kv
