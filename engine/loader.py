"""Load a Hugging Face checkpoint directory (config.json + safetensors, sharded or not) into our models."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

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


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read weights file {path}: {exc}") from exc
    return tensors


def _match_keys(model: CausalLM, loaded: dict[str, torch.Tensor], model_dir: Path) -> dict[str, torch.Tensor]:
    """Map checkpoint keys onto our parameter names (with or without the family's prefix)."""
    expected = dict(model.named_parameters(remove_duplicate=False))
    state: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in (pair for entry in loaded.items() for pair in model.checkpoint_tensors(*entry)):
        name = key if key in expected else model.key_prefix + key
        if name not in expected:
            if key.endswith(model.ignored_key_suffixes):
                continue
            unexpected.append(key)
            continue
        if key.endswith(model.transposed_weight_suffixes):
            tensor = tensor.t()
        state[name] = tensor
    if unexpected:
        raise CheckpointError(
            f"{model_dir}: weights {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} do not belong to a "
            f"{model.config.model_type} model with this config"
        )
    head = next(name for name, module in model.named_modules() if module is model.lm_head_module)
    tied = f"{head}.weight" if model.config.tie_word_embeddings else None
    missing = [n for n in expected if n not in state and n != tied]
    if missing:
        raise CheckpointError(f"{model_dir}: checkpoint is missing weights {missing[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{model_dir}: weight {name} has shape {tuple(tensor.shape)}, config implies {tuple(expected[name].shape)}"
            )
    return state


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
    loaded = read_state_dict(model_dir)
    if config.quantization == "mxfp4":  # (gpt-oss's experts)
        loaded = mxfp4.dequantize_entries(loaded, dt)
    elif config.quantization == "fp8":
        loaded = fp8.dequantize_entries(loaded, dt, config.quantization_block)
    state = _match_keys(model, loaded, model_dir)
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{model_dir}: weight {name} has non-float dtype {tensor.dtype}")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{model_dir}: weight {name} contains NaN or Inf")
    kept = model.fp32_key_suffixes
    model.load_state_dict({k: v.to(device=dev, dtype=torch.float32 if k.endswith(kept) else dt)
                           for k, v in state.items()}, strict=False, assign=True)
    model.requires_grad_(False)
    model.tie_weights()
    with torch.no_grad():
        model.init_buffers(dev)
        model.prepare_for_inference(dev)
    model.eval()
    return model
