"""What a user writes without our engine: plain HF generate with soft prompts (dynamic cache, or static cache +
torch.compile on CUDA), and PEFT prompt tuning. All run on the workload's device and dtype."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from .workloads import WorkItem, Workload

PAD_ID = 3  # the tiny checkpoints' <pad>


def sync(device: torch.device | str) -> None:
    """Wait for queued CUDA work, so a clock read after it counts it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def batches(items: list[WorkItem], size: int) -> Iterator[list[WorkItem]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message="Position ids are not supported.*")


def _gen_kwargs(new_tokens: int) -> dict:
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD_ID)


def _load_hf(workload: Workload, dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    cfg = workload.config
    model = AutoModelForCausalLM.from_pretrained(workload.model_dir, dtype=dtype or cfg.torch_dtype)
    return model.to(cfg.device).eval()


class StepTimes:
    """A `generate` streamer that records the clock at every generated token (the first `put` is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        value.cpu()  # generate already moved it; this keeps the clock honest if it ever stops doing so
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HFMixedTask:
    """HF generate over batches in arrival order (tasks mixed in a batch): inputs_embeds = [prompt ; embed(ids)],
    left-padded with an attention mask; the default DynamicCache."""

    name = "hf_mixed"
    label = "HF mixed-task inputs_embeds"

    def __init__(self, workload: Workload):
        self.workload = workload
        self.device = torch.device(workload.config.device)
        self.model = _load_hf(workload)
        self.embed = self.model.get_input_embeddings()
        self.prompts = [p.to(self.device, workload.config.torch_dtype) for p in workload.prompts]

    def _inputs(self, items: list[WorkItem], width: int | None = None,
                rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded [rows, width, hidden] embeddings and their mask; extra rows repeat the first item."""
        seqs = [torch.cat([self.prompts[it.task], self.embed(torch.tensor(it.input_ids, device=self.device))])
                for it in items]
        seqs += [seqs[0]] * ((rows or len(seqs)) - len(seqs))
        width = width or max(s.shape[0] for s in seqs)
        embeds = torch.zeros(len(seqs), width, seqs[0].shape[1], dtype=seqs[0].dtype, device=self.device)
        mask = torch.zeros(len(seqs), width, dtype=torch.long, device=self.device)
        for i, s in enumerate(seqs):
            embeds[i, width - s.shape[0]:] = s
            mask[i, width - s.shape[0]:] = 1
        return embeds, mask

    def _extra_kwargs(self) -> dict:
        return {}

    @torch.no_grad()
    def run_batch(self, items: list[WorkItem], streamer: StepTimes | None = None) -> list[list[int]]:
        new_tokens = self.workload.config.new_tokens
        embeds, mask = self._inputs(items)
        out = self.model.generate(inputs_embeds=embeds, attention_mask=mask, streamer=streamer,
                                  **_gen_kwargs(new_tokens), **self._extra_kwargs())
        return out[:len(items), -new_tokens:].tolist()

    def generate(self, items: list[WorkItem]) -> list[list[int]]:
        cfg = self.workload.config
        return [t for batch in batches(items, cfg.batch_size) for t in self.run_batch(batch)]

    def warmup(self) -> None:
        self.generate(self.workload.items[:2])

    def reset(self) -> None:
        pass

    def info(self) -> dict:
        return {"batch_size": self.workload.config.batch_size, "cache": "DynamicCache"}


class HFStaticCompiled(HFMixedTask):
    """HF generate with a StaticCache and `torch.compile` (transformers compiles the decode forward itself when the
    cache is static), every batch padded to one [batch_size, P + max_input] shape so a single compiled graph serves
    the whole run. Meant for CUDA; `compile_on_cpu=True` only exists to smoke-test the code path."""

    name = "hf_static"
    label = "HF static cache + torch.compile"

    def __init__(self, workload: Workload, compile_on_cpu: bool = False, mode: str | None = None):
        from transformers import CompileConfig

        super().__init__(workload)
        cfg = workload.config
        self.width = cfg.prompt_len + cfg.max_input
        mode = mode or ("reduce-overhead" if self.device.type == "cuda" else "default")  # CUDA graphs on CUDA
        self.compile_config = CompileConfig(mode=mode)
        if compile_on_cpu:
            self.compile_config._compile_all_devices = True

    def _inputs(self, items, width=None, rows=None):
        return super()._inputs(items, width=self.width, rows=self.workload.config.batch_size)

    def _extra_kwargs(self) -> dict:
        return dict(cache_implementation="static", max_cache_len=self.width + self.workload.config.new_tokens,
                    compile_config=self.compile_config)

    def warmup(self) -> None:
        for _ in range(3):  # compile, then CUDA-graph recording in "reduce-overhead" mode
            self.run_batch(self.workload.items[:2])

    @property
    def compiled(self) -> bool:
        return hasattr(self.model, "_compiled_call")

    def info(self) -> dict:
        return {"batch_size": self.workload.config.batch_size, "cache": "StaticCache", "padded_width": self.width,
                "compile_mode": self.compile_config.mode, "compiled": self.compiled}


@torch.no_grad()
def fp32_reference(workload: Workload, items: list[WorkItem]) -> list[list[int]]:
    """The fp32 answer for a half-precision workload: HF in float32 on the same (upcast) weights, each request alone
    (no padding), its prompt rounded to the workload's dtype first, as every system receives it."""
    cfg = workload.config
    model = _load_hf(workload, torch.float32)
    embed = model.get_input_embeddings()
    result = []
    for it in items:
        prompt = workload.prompts[it.task].to(cfg.torch_dtype).to(cfg.device, torch.float32)
        embeds = torch.cat([prompt, embed(torch.tensor(it.input_ids, device=cfg.device))])[None]
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=cfg.device)
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, **_gen_kwargs(cfg.new_tokens))
        result.append(out[0, -cfg.new_tokens:].tolist())
    return result


def build_peft_adapters(workload: Workload, root: Path) -> list[Path]:
    """One saved PEFT prompt-tuning adapter per task, holding that task's soft prompt."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=workload.config.prompt_len)
    base = AutoModelForCausalLM.from_pretrained(workload.model_dir, dtype=workload.config.torch_dtype)
    peft_model = get_peft_model(base, cfg)
    weight = peft_model.prompt_encoder["default"].embedding.weight
    dirs = []
    for task, prompt in enumerate(workload.prompts):
        with torch.no_grad():
            weight.copy_(prompt)
        dirs.append(root / f"peft-{Workload.task_name(task)}")
        peft_model.save_pretrained(dirs[-1])
    return dirs


class PeftPerTask:
    """One PeftModel with every task loaded as a named adapter; requests grouped by task, `set_adapter` per group,
    batches of up to `batch_size` left-padded input ids."""

    name = "peft"
    label = "PEFT prompt tuning, grouped by task"

    def __init__(self, workload: Workload, adapter_dirs: list[Path]):
        from peft import PeftModel

        self.workload = workload
        self.device = torch.device(workload.config.device)
        base = _load_hf(workload)
        names = [Workload.task_name(t) for t in range(len(adapter_dirs))]
        self.model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name=names[0]).to(self.device).eval()
        for name, path in zip(names[1:], adapter_dirs[1:]):
            self.model.load_adapter(path, adapter_name=name)
        self.model.to(self.device)

    @torch.no_grad()
    def _batch(self, items: list[WorkItem], new_tokens: int) -> list[list[int]]:
        width = max(len(it.input_ids) for it in items)
        ids = torch.full((len(items), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros(len(items), width, dtype=torch.long)
        for i, it in enumerate(items):
            ids[i, width - len(it.input_ids):] = torch.tensor(it.input_ids)
            mask[i, width - len(it.input_ids):] = 1
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                  **_gen_kwargs(new_tokens))
        return out[:, -new_tokens:].tolist()

    def generate_unpadded(self, items: list[WorkItem]) -> list[list[int]]:
        """One request at a time. PEFT prompt tuning drops `position_ids` and puts the virtual tokens before the
        left padding, so in a padded batch the shorter inputs see shifted positions (huggingface/peft#1093);
        unpadded is PEFT's exact answer, the one to check our tokens against."""
        result = []
        for it in items:
            self.model.set_adapter(Workload.task_name(it.task))
            result.extend(self._batch([it], self.workload.config.new_tokens))
        return result

    def generate(self, items: list[WorkItem]) -> list[list[int]]:
        """Token ids per item, in the order of `items`."""
        cfg = self.workload.config
        by_task: dict[int, list[WorkItem]] = {}
        for it in items:
            by_task.setdefault(it.task, []).append(it)
        result: dict[int, list[int]] = {}
        for task, group in by_task.items():
            self.model.set_adapter(Workload.task_name(task))
            for batch in batches(group, cfg.batch_size):
                for it, tokens in zip(batch, self._batch(batch, cfg.new_tokens)):
                    result[it.index] = tokens
        return [result[it.index] for it in items]

    def warmup(self) -> None:
        self.generate(self.workload.items[:2])

    def reset(self) -> None:
        pass

    def info(self) -> dict:
        return {"batch_size": self.workload.config.batch_size, "adapters": len(self.workload.prompts)}
