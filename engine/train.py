"""`softprompt train`: prompt tuning (or P-tuning, or prefix tuning) over a frozen causal LM with HF transformers +
PEFT and a plain torch loop.

Loss: cross-entropy on the target tokens only; the input is `tokenizer(input)` (with BOS, as PEFT users do), the
target `tokenizer(target, add_special_tokens=False)` + EOS. Output: a PEFT adapter directory of the method
(`PeftModel.from_pretrained` and `Engine.add_prompt` both load it) plus `softprompt_train.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .datasets import Example, dataset_hash, load_pairs, make_category_task, save_pairs, split
from .errors import SoftPromptError
from .hub import resolve_model
from .testing import _quiet  # silences HF progress bars and PEFT deprecation chatter

__all__ = ["DEFAULT_LR", "ENCODERS", "INITS", "METADATA_FILE", "METHODS", "TrainConfig", "TrainResult",
           "add_train_arguments", "run_train", "train_prompt"]

INITS = ("random", "vocab", "text")
METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")  # PEFT PromptTuning, PromptEncoder, PrefixTuning
ENCODERS = ("MLP", "LSTM")  # P-tuning's prompt encoder
# AdamW learning rates that train each method well (prompt tuning moves raw embedding rows; the others train
# through an encoder, or the K/V themselves, and diverge at that rate)
DEFAULT_LR = {"prompt_tuning": 0.3, "p_tuning": 0.01, "prefix_tuning": 0.01}
METADATA_FILE = "softprompt_train.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IGNORE = -100


@dataclass
class TrainConfig:
    method: str = "prompt_tuning"  # | "p_tuning" | "prefix_tuning"
    num_virtual_tokens: int = 20
    lr: float | None = None  # default: DEFAULT_LR[method]
    epochs: int = 10
    batch_size: int = 8
    weight_decay: float = 0.0
    l2_to_init: float = 0.0  # adds l2_to_init * mean over prompt rows of ||row - row_at_init||^2 to the loss
    patience: int = 3  # epochs without a better validation loss before stopping (0: never stop early)
    init: str = "random"  # random (PEFT RANDOM) | vocab (rows sampled from the vocabulary) | text (PEFT TEXT)
    init_text: str | None = None
    seed: int = 0
    device: str | None = None  # default: cuda if available, else cpu
    dtype: str | None = None  # the frozen model's dtype; default float32
    encoder: str = "MLP"  # p_tuning: the prompt encoder (MLP or LSTM)
    encoder_hidden_size: int = 128  # p_tuning's encoder, and prefix_tuning's projection when prefix_projection
    prefix_projection: bool = False  # prefix_tuning: train the K/V through PEFT's MLP (saved as its output)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise SoftPromptError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.method]
        if self.method != "prompt_tuning" and (self.init != "random" or self.l2_to_init):
            raise SoftPromptError(f"init and l2_to_init apply to prompt_tuning; {self.method} starts from PEFT's "
                                  "random init")
        if self.encoder not in ENCODERS:
            raise SoftPromptError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.encoder_hidden_size < 1:
            raise SoftPromptError("encoder_hidden_size must be >= 1")
        if self.init not in INITS:
            raise SoftPromptError(f"init must be one of {INITS}, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise SoftPromptError("init='text' needs init_text (--init-text)")
        if self.num_virtual_tokens < 1 or self.epochs < 1 or self.batch_size < 1:
            raise SoftPromptError("num_virtual_tokens, epochs and batch_size must be >= 1")
        if not self.lr > 0 or self.weight_decay < 0 or self.l2_to_init < 0 or self.patience < 0:
            raise SoftPromptError("lr must be > 0; weight_decay, l2_to_init and patience must be >= 0")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise SoftPromptError(f"dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}")


@dataclass
class TrainResult:
    out_dir: Path
    version: str  # the version the engine gives the saved adapter in the model dtype (its content hash)
    train_losses: list[float]  # per epoch (mean over batches, without the L2-to-init term)
    val_losses: list[float]  # per epoch; empty without a validation set
    best_epoch: int  # 1-based epoch whose prompt was saved (lowest validation loss; the last without validation)
    val_accuracy: float | None  # greedy exact match of the target tokens on validation, with the saved prompt
    metadata: dict[str, Any]
    peft_model: Any = field(default=None, repr=False)  # the trained PeftModel (in memory; for tests and demos)


def _encode(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    input_ids = list(tokenizer(example.input)["input_ids"])
    target_ids = list(tokenizer(example.target, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        target_ids.append(tokenizer.eos_token_id)
    if not target_ids:
        raise SoftPromptError(f"target {example.target!r} tokenizes to nothing")
    return input_ids, target_ids


def _collate(encoded: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE outside the target tokens)."""
    width = max(len(i) + len(t) for i, t in encoded)
    ids, mask, labels = [], [], []
    for inp, tgt in encoded:
        pad = width - len(inp) - len(tgt)
        ids.append(inp + tgt + [pad_id] * pad)
        mask.append([1] * (len(inp) + len(tgt)) + [0] * pad)
        labels.append([IGNORE] * len(inp) + tgt + [IGNORE] * pad)
    as_tensor = lambda rows: torch.tensor(rows, dtype=torch.long, device=device)  # noqa: E731
    return {"input_ids": as_tensor(ids), "attention_mask": as_tensor(mask), "labels": as_tensor(labels)}


def _target_loss_and_hits(peft_model, batch: dict[str, torch.Tensor], num_virtual_tokens: int,
                          exclude_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example mean target cross-entropy [B] and greedy exact-match flags [B] (teacher-forced argmax over the
    target tokens, EOS excluded when `exclude_last`: equal to greedy generation reproducing the target tokens).
    `num_virtual_tokens`: the rows the prompt adds before the input's in the logits (0 for prefix tuning, whose
    virtual tokens are K/V only)."""
    out = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["labels"]
    if num_virtual_tokens:
        logits = out.logits[:, num_virtual_tokens - 1:-1].float()  # the row before input token t predicts it
    else:  # no row predicts the first input token (never a target)
        logits, labels = out.logits[:, :-1].float(), labels[:, 1:]
    valid = labels != IGNORE
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    loss = (ce * valid).sum(1) / valid.sum(1)
    checked = valid.clone()
    if exclude_last:  # drop each row's last target token (the EOS)
        last = valid.long().cumsum(1) == valid.sum(1, keepdim=True)
        checked &= ~last
    hits = ((logits.argmax(-1) == labels) | ~checked).all(1)
    return loss, hits


def _resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _load_peft_model(model_dir: str | Path, config: TrainConfig, device: torch.device):
    from peft import (
        PrefixTuningConfig,
        PromptEncoderConfig,
        PromptTuningConfig,
        PromptTuningInit,
        TaskType,
        get_peft_model,
    )
    from transformers import AutoTokenizer

    from .hf_auto import load_hf_causal_lm, peft_shape_fields, peft_token_dim

    try:
        with _quiet():
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            model = load_hf_causal_lm(model_dir, dtype=_DTYPES[config.dtype or "float32"])
    except (OSError, ValueError) as exc:
        raise SoftPromptError(f"cannot load a causal LM and its tokenizer from {model_dir}: {exc}") from exc
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    token_dim = peft_token_dim(model)
    shape = peft_shape_fields(model)  # (XGLM's heads, which PEFT cannot find)
    if config.method == "p_tuning":
        peft_config = PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.num_virtual_tokens,
                                          encoder_reparameterization_type=config.encoder,
                                          encoder_hidden_size=config.encoder_hidden_size, token_dim=token_dim,
                                          **shape)
    elif config.method == "prefix_tuning":
        peft_config = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=config.num_virtual_tokens,
                                         prefix_projection=config.prefix_projection,
                                         encoder_hidden_size=config.encoder_hidden_size, **shape)
    else:
        peft_config = PromptTuningConfig(
            task_type=TaskType.CAUSAL_LM,
            num_virtual_tokens=config.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT if config.init == "text" else PromptTuningInit.RANDOM,
            prompt_tuning_init_text=config.init_text if config.init == "text" else None,
            tokenizer_name_or_path=str(model_dir) if config.init == "text" else None,
            token_dim=token_dim,
            **shape,
        )
    torch.manual_seed(config.seed)  # PEFT's random inits draw from the global generator
    with _quiet():
        peft_model = get_peft_model(model, peft_config)
    weight = peft_model.prompt_encoder["default"].embedding.weight
    if config.init == "vocab":  # prompt tuning only (TrainConfig.validate)
        vocab = model.get_input_embeddings().weight
        gen = torch.Generator().manual_seed(config.seed)
        special = set(tokenizer.all_special_ids)
        candidates = torch.tensor([i for i in range(vocab.shape[0]) if i not in special])
        rows = candidates[torch.randint(len(candidates), (weight.shape[0],), generator=gen)]
        with torch.no_grad():
            weight.copy_(vocab[rows.to(vocab.device)].to(weight.dtype))
    peft_model.train(False)  # no dropout: the loss is a deterministic function of the prompt
    return peft_model, tokenizer


def train_prompt(model_dir: str | Path, train_examples: list[Example], val_examples: list[Example] | None,
                 out_dir: str | Path, config: TrainConfig | None = None, log=print) -> TrainResult:
    """Train a soft prompt (`config.method`: prompt tuning, P-tuning or prefix tuning) on `train_examples` (early
    stopping on `val_examples` when given); save the best one as a PEFT adapter + METADATA_FILE in `out_dir`."""
    config = config or TrainConfig()
    config.validate()
    if not train_examples:
        raise SoftPromptError("no training examples")
    val_examples = list(val_examples or [])
    model_source, model_dir = str(model_dir), resolve_model(model_dir)  # a Hub id: its local snapshot
    if config.method == "prefix_tuning":
        from .config import load_model_config

        if refusal := load_model_config(model_dir).kv_prefix_refusal:
            raise SoftPromptError(f"prefix_tuning: {refusal}")
    device = _resolve_device(config.device)
    started = time.perf_counter()
    random.seed(config.seed)
    peft_model, tokenizer = _load_peft_model(model_dir, config, device)
    encoder = peft_model.prompt_encoder["default"]
    weight = encoder.embedding.weight  # prompt tuning: the rows themselves
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    if not trainable or not {id(p) for p in trainable} <= {id(p) for p in encoder.parameters()}:
        raise SoftPromptError("internal error: only the prompt encoder may be trainable")
    init_weight = weight.detach().clone()
    P = 0 if config.method == "prefix_tuning" else config.num_virtual_tokens  # rows before the input's in the logits

    pad_id = tokenizer.pad_token_id
    train_enc = [_encode(tokenizer, e) for e in train_examples]
    val_enc = [_encode(tokenizer, e) for e in val_examples]
    exclude_eos = tokenizer.eos_token_id is not None
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in encoder.state_dict().items()}

    order_rng = random.Random(config.seed)

    @torch.no_grad()
    def evaluate(encoded) -> tuple[float, float]:
        losses, hits = [], []
        for start in range(0, len(encoded), config.batch_size):
            batch = _collate(encoded[start:start + config.batch_size], pad_id, device)
            loss, hit = _target_loss_and_hits(peft_model, batch, P, exclude_eos)
            losses.append(loss)
            hits.append(hit)
        return torch.cat(losses).mean().item(), torch.cat(hits).float().mean().item()

    train_losses: list[float] = []
    val_losses: list[float] = []
    best = (math.inf, 0, snapshot())
    stale = 0
    for epoch in range(1, config.epochs + 1):
        order = list(range(len(train_enc)))
        order_rng.shuffle(order)
        total, count = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            batch = _collate([train_enc[i] for i in order[start:start + config.batch_size]], pad_id, device)
            loss, _ = _target_loss_and_hits(peft_model, batch, P, exclude_eos)
            loss = loss.mean()
            objective = loss
            if config.l2_to_init:
                objective = objective + config.l2_to_init * (weight - init_weight).pow(2).sum(1).mean()
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            total += loss.item() * batch["input_ids"].shape[0]
            count += batch["input_ids"].shape[0]
        train_losses.append(total / count)
        line = f"epoch {epoch}: train loss {train_losses[-1]:.4f}"
        score = train_losses[-1]
        if val_enc:
            val_loss, val_acc = evaluate(val_enc)
            val_losses.append(val_loss)
            score = val_loss
            line += f", val loss {val_loss:.4f}, val exact match {val_acc:.3f}"
        if not math.isfinite(score):
            raise SoftPromptError(f"epoch {epoch}: the loss is {score}; lower the learning rate")
        if not val_enc or score < best[0]:  # without validation the last epoch's prompt is kept
            best, stale = (score, epoch, snapshot()), 0
        else:
            stale += 1
        if log:
            log(line)
        if val_enc and config.patience and stale >= config.patience:
            if log:
                log(f"early stop: no better validation loss for {stale} epochs")
            break

    with torch.no_grad():
        encoder.load_state_dict(best[2])
    val_accuracy = evaluate(val_enc)[1] if val_enc else None
    out_dir = Path(out_dir)
    with _quiet():
        peft_model.save_pretrained(str(out_dir))
    model_dtype = peft_model.get_input_embeddings().weight.dtype
    versions = _engine_versions(model_dir, out_dir)
    version = versions[str(model_dtype).removeprefix("torch.")]
    metadata = {
        "format": "softprompt-train/1",
        "model_dir": model_source,
        "method": config.method,
        "version": version,
        "version_dtype": str(model_dtype).removeprefix("torch."),
        "versions_by_dtype": versions,
        "dataset": {"train_hash": dataset_hash(train_examples), "train_size": len(train_examples),
                    "val_hash": dataset_hash(val_examples) if val_examples else None,
                    "val_size": len(val_examples)},
        "init": {"kind": config.init, "text": config.init_text if config.init == "text" else None},
        "config": asdict(config),
        "train_losses": train_losses,
        "val_losses": val_losses,
        "best_epoch": best[1],
        "epochs_run": len(train_losses),
        "val_exact_match": val_accuracy,
        "device": str(device),
        "seconds": round(time.perf_counter() - started, 3),
    }
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return TrainResult(out_dir, version, train_losses, val_losses, best[1], val_accuracy, metadata, peft_model)


def _engine_versions(model_dir: str | Path, adapter_dir: Path) -> dict[str, str]:
    """The version `Engine.add_prompt` gives the saved adapter, per dtype (the rows, or a prefix's K/V, cast)."""
    from .config import load_model_config
    from .prompts import PromptStore

    cfg = load_model_config(model_dir)
    layout = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    versions = {}
    for name, dtype in _DTYPES.items():
        store = PromptStore(cfg.embedding_width, dtype, torch.device("cpu"), cfg.max_positions, cfg.vocab_size,
                            embed_tokens=lambda ids: None, kv_layout=layout, key_channel_order=cfg.key_channel_order)
        versions[name] = store.add("trained", adapter_dir).version
    return versions


# ---- the demo --------------------------------------------------------------------------------------------------

DEMO_TEXT_PROMPT = "name the category (fruit, animal, color or tool) of the word:"


def first_word_accuracy(engine, prompt: str | None, examples: list[Example], max_new_tokens: int = 8) -> float:
    """Greedy exact match of the target's first word, generated by `engine` under `prompt` (a name or None)."""
    from .request import Request
    from .sampling import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens)
    outputs = engine.generate([Request(prompt=prompt, text=e.input, sampling=params) for e in examples])
    first = lambda s: (s or "").split()[0] if (s or "").split() else ""  # noqa: E731
    return sum(first(o.text) == first(e.target) for o, e in zip(outputs, examples)) / len(examples)


DEMO_MODEL = dict(arch="llama", hidden_size=128, num_layers=4, num_heads=4, vocab_size=512)  # 2x64 barely learns
DEMO_CONFIG = TrainConfig(num_virtual_tokens=20, lr=0.3, epochs=40, batch_size=16, patience=6, init="random",
                          device="cpu")


def run_demo(out_dir: str | Path, config: TrainConfig | None = None, log=print) -> dict[str, float]:
    """Build a tiny checkpoint + the synthetic category task in `out_dir`, train a prompt and compare first-word
    accuracy on the validation split: tuned prompt vs no prompt vs a text prompt. Returns the accuracies."""
    from .api import Engine
    from .testing import build_tiny_checkpoint

    out_dir = Path(out_dir)
    config = config or DEMO_CONFIG
    arch = DEMO_MODEL["arch"]
    model_dir = build_tiny_checkpoint(arch, out_dir / "model", **{k: v for k, v in DEMO_MODEL.items() if k != "arch"})
    examples = make_category_task(96 * 2, seed=config.seed)
    save_pairs(examples, out_dir / "category_task.jsonl")
    train, val = split(examples, 0.25, seed=config.seed)
    if log:
        log(f"tiny {arch} checkpoint in {model_dir}; {len(train)} train / {len(val)} validation examples "
            f"like {train[0].input!r} -> {train[0].target!r}")
    result = train_prompt(model_dir, train, val, out_dir / "adapter", config, log=log)
    engine = Engine(model_dir, device=config.device or "cpu", dtype="float32")
    engine.add_prompt("tuned", out_dir / "adapter")
    engine.add_prompt("text", text=DEMO_TEXT_PROMPT)
    scores = {"tuned": first_word_accuracy(engine, "tuned", val), "none": first_word_accuracy(engine, None, val),
              "text": first_word_accuracy(engine, "text", val)}
    if log:
        log(f"validation first-word accuracy (engine, greedy): tuned prompt {scores['tuned']:.3f} | "
            f"no prompt {scores['none']:.3f} | text prompt {scores['text']:.3f}  (prompt version {result.version})")
    return scores


# ---- CLI -------------------------------------------------------------------------------------------------------

def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("model_dir", nargs="?", help="Hugging Face causal LM checkpoint directory (with tokenizer), or a "
                   "Hub model id (org/name or org/name@revision)")
    p.add_argument("--data", help="training JSONL: one {\"input\": ..., \"target\": ...} per line")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val", help="validation JSONL (default: split off --val-fraction of --data)")
    val.add_argument("--val-fraction", type=float, default=0.2, help="validation share of --data (0: none)")
    p.add_argument("--out", help="output adapter directory")
    p.add_argument("--method", choices=METHODS, default=d.method,
                   help="PEFT prompt learning: prompt tuning (rows), P-tuning (rows from a prompt encoder) or prefix "
                        "tuning (every layer's K/V)")
    p.add_argument("--num-virtual-tokens", type=int, default=d.num_virtual_tokens)
    p.add_argument("--lr", type=float, default=None,
                   help=f"AdamW learning rate (default: {', '.join(f'{k} {v}' for k, v in DEFAULT_LR.items())})")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decoupled weight decay")
    p.add_argument("--l2-to-init", type=float, default=d.l2_to_init,
                   help="penalty on the mean squared distance of the prompt rows from their initial values")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="stop after this many epochs without a better validation loss (0: never)")
    p.add_argument("--init", choices=INITS, default=d.init)
    p.add_argument("--init-text", default=None, help="text whose token embeddings initialize the prompt (--init text)")
    p.add_argument("--encoder", choices=ENCODERS, default=d.encoder, help="p_tuning: the prompt encoder")
    p.add_argument("--encoder-hidden-size", type=int, default=d.encoder_hidden_size,
                   help="p_tuning's encoder width, and prefix_tuning's with --prefix-projection")
    p.add_argument("--prefix-projection", action="store_true",
                   help="prefix_tuning: train the K/V through PEFT's two-layer MLP")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=tuple(_DTYPES), help="frozen model dtype (default float32)")
    p.add_argument("--demo", metavar="OUT_DIR", default=None,
                   help="ignore the other inputs: train on a synthetic task with a tiny model on the CPU (< 1 min)")


def run_train(args: argparse.Namespace) -> int:
    if args.demo:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))  # tiny matmuls: more threads only cost
        scores = run_demo(args.demo)
        return 0 if scores["tuned"] > max(scores["none"], scores["text"]) else 1
    missing = [flag for flag, value in (("MODEL_DIR", args.model_dir), ("--data", args.data), ("--out", args.out))
               if not value]
    if missing:
        raise SoftPromptError(f"softprompt train needs {', '.join(missing)} (or --demo OUT_DIR)")
    config = TrainConfig(method=args.method, encoder=args.encoder, encoder_hidden_size=args.encoder_hidden_size,
                         prefix_projection=args.prefix_projection,
                         num_virtual_tokens=args.num_virtual_tokens, lr=args.lr, epochs=args.epochs,
                         batch_size=args.batch_size, weight_decay=args.weight_decay, l2_to_init=args.l2_to_init,
                         patience=args.patience, init=args.init, init_text=args.init_text, seed=args.seed,
                         device=args.device, dtype=args.dtype)
    config.validate()
    examples = load_pairs(args.data)
    if args.val:
        train, val = examples, load_pairs(args.val)
    else:
        train, val = split(examples, args.val_fraction, seed=args.seed)
    result = train_prompt(args.model_dir, train, val, args.out, config)
    acc = "n/a" if result.val_accuracy is None else f"{result.val_accuracy:.3f}"
    print(f"saved {args.out} (version {result.version}, best epoch {result.best_epoch}, validation exact match {acc})")
    return 0
