"""What a user writes without our engine: plain HF generate with soft prompts, and PEFT prompt tuning."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from .workloads import WorkItem, Workload

PAD_ID = 3  # the tiny checkpoints' <pad>


def _batches(items: list[WorkItem], size: int) -> Iterator[list[WorkItem]]:
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


class HFMixedTask:
    """HF generate over batches in arrival order (tasks mixed in a batch): inputs_embeds = [prompt ; embed(ids)],
    left-padded with an attention mask; the default DynamicCache."""

    def __init__(self, workload: Workload):
        from transformers import AutoModelForCausalLM

        _quiet_transformers()
        self.workload = workload
        self.model = AutoModelForCausalLM.from_pretrained(workload.model_dir, dtype=torch.float32).eval()
        self.embed = self.model.get_input_embeddings()

    @torch.no_grad()
    def _batch(self, items: list[WorkItem], new_tokens: int) -> list[list[int]]:
        rows = [torch.cat([self.workload.prompts[it.task], self.embed(torch.tensor(it.input_ids))]) for it in items]
        width = max(r.shape[0] for r in rows)
        embeds = torch.zeros(len(rows), width, rows[0].shape[1])
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            embeds[i, width - r.shape[0]:] = r
            mask[i, width - r.shape[0]:] = 1
        out = self.model.generate(inputs_embeds=embeds, attention_mask=mask, **_gen_kwargs(new_tokens))
        return out[:, -new_tokens:].tolist()

    def generate(self, items: list[WorkItem]) -> list[list[int]]:
        cfg = self.workload.config
        return [t for batch in _batches(items, cfg.batch_size) for t in self._batch(batch, cfg.new_tokens)]


def build_peft_adapters(workload: Workload, root: Path) -> list[Path]:
    """One saved PEFT prompt-tuning adapter per task, holding that task's soft prompt."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=workload.config.prompt_len)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(workload.model_dir, dtype=torch.float32), cfg)
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

    def __init__(self, workload: Workload, adapter_dirs: list[Path]):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        _quiet_transformers()
        self.workload = workload
        base = AutoModelForCausalLM.from_pretrained(workload.model_dir, dtype=torch.float32)
        names = [Workload.task_name(t) for t in range(len(adapter_dirs))]
        self.model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name=names[0]).eval()
        for name, path in zip(names[1:], adapter_dirs[1:]):
            self.model.load_adapter(path, adapter_name=name)

    @torch.no_grad()
    def _batch(self, items: list[WorkItem], new_tokens: int) -> list[list[int]]:
        width = max(len(it.input_ids) for it in items)
        ids = torch.full((len(items), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros(len(items), width, dtype=torch.long)
        for i, it in enumerate(items):
            ids[i, width - len(it.input_ids):] = torch.tensor(it.input_ids)
            mask[i, width - len(it.input_ids):] = 1
        out = self.model.generate(input_ids=ids, attention_mask=mask, **_gen_kwargs(new_tokens))
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
            for batch in _batches(group, cfg.batch_size):
                for it, tokens in zip(batch, self._batch(batch, cfg.new_tokens)):
                    result[it.index] = tokens
        return [result[it.index] for it in items]
