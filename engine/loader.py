"""Load a Hugging Face checkpoint directory (config.json + safetensors, sharded or not) into our models."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from . import fp8, mxfp4
from .config import ModelConfig, load_model_config
from .errors import CheckpointError
from .models import MODEL_CLASSES, CausalLM

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None, config: ModelConfig, device: torch.device) -> torch.dtype:
    """`None`/"auto": the checkpoint's dtype on CUDA, float32 on the CPU (half-precision matmuls are slow there)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise CheckpointError(f"unsupported dtype {dtype}; use float32, float16 or bfloat16")
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cpu":
            return torch.float32
        saved = getattr(config.hf_config, "dtype", None) or getattr(config.hf_config, "torch_dtype", None)
        if isinstance(saved, str):
            saved = DTYPES.get(saved)
        return saved if saved in DTYPES.values() else torch.float32
    if dtype not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; use one of float32, float16, bfloat16, auto")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise CheckpointError(f"invalid device {device!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise CheckpointError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index ({exc})") from exc
        names = sorted(set(weight_map.values()))
        for name in names:
            if Path(name).name != name:
                raise CheckpointError(f"{index} names shard {name!r} outside the checkpoint directory")
            if not (model_dir / name).is_file():
                raise CheckpointError(f"{index} names shard {name!r}, which is missing from {model_dir}")
        return [model_dir / name for name in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise CheckpointError(
            f"{model_dir} has only pickle weights (*.bin/*.pt); the engine reads safetensors only, "
            "never unpickling weights: convert with model.save_pretrained(dir, safe_serialization=True)"
        )
    raise CheckpointError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")


class CheckpointTensors(Mapping[str, torch.Tensor]):
    """A checkpoint's tensors by key, each read from its safetensors file only when asked for (so a loader that
    takes them one at a time holds one in host memory, not the whole checkpoint). Use as a context manager: the
    files stay open inside it."""

    def __init__(self, model_dir: Path):
        self._files = weight_files(model_dir)
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}

    def __enter__(self) -> CheckpointTensors:
        try:
            for path in self._files:
                self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                self._where.update(dict.fromkeys(self._handles[path].keys(), path))
        except (SafetensorError, OSError, RuntimeError) as exc:
            self._stack.close()
            raise CheckpointError(f"cannot read weights file {path}: {exc}") from exc
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stack.close()

    def __getitem__(self, key: str) -> torch.Tensor:
        path = self._where[key]
        try:
            return self._handles[path].get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read {key} from weights file {path}: {exc}") from exc

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _load_entries(model: CausalLM, entries: Iterable[tuple[str, torch.Tensor]], model_dir: Path,
                  device: torch.device, dtype: torch.dtype) -> None:
    """Each checkpoint entry under our parameter names (with or without the family's prefix), checked (a float,
    finite, of the shape the config implies), cast and moved to the device and put in the model, one at a time."""
    expected = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    unexpected = []
    for key, tensor in (pair for entry in entries for pair in model.checkpoint_tensors(*entry)):
        name = key if key in expected else model.key_prefix + key
        if name not in expected:
            if not key.endswith(model.ignored_key_suffixes):
                unexpected.append(key)
            continue
        if key.endswith(model.transposed_weight_suffixes):
            tensor = tensor.t()
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{model_dir}: weight {name} has shape {tuple(tensor.shape)}, config implies {tuple(expected[name].shape)}"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{model_dir}: weight {name} has non-float dtype {tensor.dtype}")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{model_dir}: weight {name} contains NaN or Inf")
        fp32 = name.endswith(model.fp32_key_suffixes) or (
            dtype == torch.float16 and name.endswith(model.fp32_in_fp16_key_suffixes))
        cast = torch.float32 if fp32 else dtype
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr,
                nn.Parameter(tensor.to(device=device, dtype=cast), requires_grad=False))
        loaded.add(name)
    if unexpected:
        raise CheckpointError(
            f"{model_dir}: weights {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} do not belong to a "
            f"{model.config.model_type} model with this config"
        )
    head = next(name for name, module in model.named_modules() if module is model.lm_head_module)
    tied = f"{head}.weight" if model.config.tie_word_embeddings else None
    missing = [n for n in expected if n not in loaded and n != tied]
    for name in [n for n in missing if n.endswith(model.optional_key_suffixes)]:
        module_name, _, attr = name.rpartition(".")
        cast = torch.float32 if name.endswith(model.fp32_key_suffixes) else dtype
        setattr(model.get_submodule(module_name), attr,
                nn.Parameter(torch.zeros(expected[name].shape, device=device, dtype=cast), requires_grad=False))
        missing.remove(name)
    if missing:
        raise CheckpointError(f"{model_dir}: checkpoint is missing weights {missing[:5]}")


def load_model(
    model_dir: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> CausalLM:
    """Build our implementation of the checkpoint's architecture and load its weights."""
    model_dir = Path(model_dir)
    config = load_model_config(model_dir)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, config, dev)
    with torch.device("meta"):
        model = MODEL_CLASSES[config.family](config)
    with CheckpointTensors(model_dir) as tensors:  # one tensor at a time from disk into the model
        entries: Iterable[tuple[str, torch.Tensor]] = tensors.items()
        if config.quantization == "mxfp4":  # (gpt-oss's experts)
            entries = mxfp4.dequantize_entries(tensors, dt)
        elif config.quantization == "fp8":
            entries = fp8.dequantize_entries(tensors, dt, config.quantization_block)
        _load_entries(model, entries, model_dir, dev, dt)
    model.requires_grad_(False)
    model.tie_weights()
    with torch.no_grad():
        model.init_buffers(dev)
        model.prepare_for_inference(dev)
    model.eval()
    return model
