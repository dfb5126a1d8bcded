"""PEFT prompt-learning adapters beyond prompt tuning, against HF transformers + PEFT on every architecture family.

- P-tuning (`PromptEncoderConfig`): PEFT saves its prompt encoder's output rows, and inference prepends them as a
  soft prompt's rows.
- Prefix tuning (`PrefixTuningConfig`): the adapter holds every layer's K/V of the virtual tokens; the engine
  stores them in the pool as they are (no prefix compute) and the input takes positions P.. after them.
- Cartridges (`CartridgeConfig`): a trained prefix K/V cache in prefix tuning's layout.
- CPT (`CPTConfig`): PEFT saves the context tokens' embeddings plus the projected delta, prepended as rows.
- Multitask prompt tuning (`MultitaskPromptTuningConfig`): task t's rows are the shared rows times a rank-r matrix;
  the engine serves one task per registered prompt (`task_id=`, or `DIR#N`).
All of them share batches with prompt-tuning tasks and the bare model. `Engine.prompt_logprobs` (the server's `echo`) is
checked here against HF + PEFT too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.errors import PromptError
from softprompt.engine.kv_pool import KVPool
from softprompt.engine.verify import verify
from softprompt.testing import (
    assert_generation_matches,
    build_cartridge_adapter,
    build_cpt_adapter,
    build_multitask_prompt_tuning_adapter,
    build_p_tuning_adapter,
    build_prefix_tuning_adapter,
    build_tiny_checkpoint,
    hf_peft_reference,
)

from .conftest import ARCH_VARIANTS
from .runtime_helpers import assert_no_leaks

pytest.importorskip("peft")

_built: dict[str, dict] = {}
# PEFT's CPTConfig resets the head count it cannot read off their configs (Mamba's has none)
CPT_UNBUILDABLE = ("xglm", "mpt", "dbrx", "mamba")
# latent attention: no per-head K/V for prefix tuning or cartridges (HF + PEFT fail on them); Gemma 4: K/V shapes
# that differ by layer, which PEFT's prefix fits to some layers and skips in others; Qwen3.5, LFM2, Granite 4.0's
# hybrids, Bamba, Nemotron-H, Mamba, Jamba, LFM2-MoE, OLMo Hybrid, Falcon-H1, LFM3: layers with a recurrent state,
# no K/V
KV_UNSERVABLE = ("deepseek_v3", "deepseek_v2", "minicpm3", "gemma4", "gemma4_moe", "gemma4_unified", "qwen3_5",
                 "lfm2", "granite_hybrid", "nemotron_h", "bamba", "mamba", "mamba2", "jamba", "lfm2_moe", "olmo_hybrid",
                 "falcon_h1", "lfm3", "mimo_v2_flash", "axk1", "longcat_flash",
                 "kimi_linear")
KV_TASKS = ("kv", "kv_proj", "cart")


@pytest.fixture
def adapters(model_dir_for, adapter_for, model_root):
    """adapters(variant) -> {task: adapter dir}: P-tuning (MLP and LSTM encoders), prefix tuning (plain and
    through PEFT's prefix projection), a cartridge, CPT, two tasks of one multitask prompt-tuning adapter (`DIR#N`)
    and prompt tuning."""

    def make(variant: str) -> dict:
        if variant not in _built:
            d, out = model_dir_for(variant), model_root / "methods" / variant
            mpt = build_multitask_prompt_tuning_adapter(d, out / "mpt", num_virtual_tokens=4, num_tasks=3, seed=6)
            _built[variant] = {
                "cart": build_cartridge_adapter(d, out / "cart", num_virtual_tokens=5, seed=7),
                "mpt0": f"{mpt}#0",
                "mpt2": f"{mpt}#2",
                "ptune": build_p_tuning_adapter(d, out / "ptune", num_virtual_tokens=5, seed=1),
                "ptune_lstm": build_p_tuning_adapter(d, out / "ptune_lstm", num_virtual_tokens=3, encoder="LSTM",
                                                     seed=2),
                "kv": build_prefix_tuning_adapter(d, out / "kv", num_virtual_tokens=7, seed=3),
                "kv_proj": build_prefix_tuning_adapter(d, out / "kv_proj", num_virtual_tokens=4,
                                                           projection=True, seed=4),
                "soft": adapter_for(variant, seed=5, num_virtual_tokens=6),
            }
            if variant in KV_UNSERVABLE:
                _built[variant] = {k: v for k, v in _built[variant].items() if k not in KV_TASKS}
            if variant not in CPT_UNBUILDABLE:
                _built[variant]["cpt"] = build_cpt_adapter(d, out / "cpt", token_ids=[11, 12, 13, 14, 15, 16], seed=8)
        return _built[variant]

    return make


def requests(tasks, seed: int = 0, max_new_tokens: int = 6) -> list[Request]:
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 9, 1, 12, 3, 6, 4]
    return [Request(prompt=task, input_ids=torch.randint(4, 500, (lengths[i % len(lengths)],), generator=g).tolist(),
                    sampling=SamplingParams(max_new_tokens=max_new_tokens))
            for i, task in enumerate([*tasks, None, "kv" if "kv" in tasks else "soft", "ptune"])]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("variant", [*ARCH_VARIANTS, "mistral", "bloom_post_norm", "mixtral", "phi", "opt",
                                     "gpt_bigcode", "granite", "stablelm_parallel", "olmo3", "exaone4",
                                     "falcon_serial", "gptj", "cohere_qk_norm", "cohere2",
                                     "glm4", "ernie4_5", "olmo", "gpt_neo", "helium", "nemotron",
                                     "hyperclovax", "jais2", "apertus", "codegen",
                                     "xglm", "biogpt", "qwen2_5_vl", "glm4_moe",
                                     "ernie4_5_moe", "gpt_oss", "minimax_m2", "llama4_text", "phimoe",
                                     "afmoe", "granite_swa", "cohere2_moe", "kolibri1",
                                     "flint", "mpt", "persimmon", "dbrx",
                                     "nanochat", "hy_v3", "laguna",
                                     *KV_UNSERVABLE])
def test_prompt_learning_adapters_match_hf_peft(variant, backend, adapters, model_dir_for):
    tasks = adapters(variant)
    engine = Engine(model_dir_for(variant), device="cpu", dtype="float32", backend=backend, block_size=4)
    for name, path in tasks.items():
        engine.add_prompt(name, path)
    kinds = {name: engine.prompts.get(name).kind for name in tasks}
    expected = {"ptune": "peft", "ptune_lstm": "peft", "kv": "prefix", "kv_proj": "prefix", "soft": "peft",
                "cart": "prefix", "cpt": "peft", "mpt0": "peft", "mpt2": "peft"}
    assert kinds == {k: v for k, v in expected.items() if k in tasks}
    assert len(tasks) == 9 - (variant in CPT_UNBUILDABLE) - 3 * (variant in KV_UNSERVABLE)
    c = engine.config
    if "kv" in tasks:
        assert engine.prompts.get("kv").kv.shape == (c.num_layers, 2, 7, c.num_kv_heads, c.head_dim)
        assert engine.prompts.get("kv").length == 7 and engine.prompts.get("kv").embeds is None
    # greedy tokens and fp32 logits (1e-4 / 1e-3) at every position, each request alone and all in one batch
    assert_generation_matches(engine, hf_peft_reference(model_dir_for(variant), tasks), requests(tasks))
    if backend == "torch":
        assert_no_leaks(engine)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["llama", "bloom"])
def test_half_precision_matches_hf_peft(variant, dtype, adapters, model_dir_for):
    """`softprompt verify`'s tolerances for the dtype, and the same greedy tokens as HF + PEFT in that dtype."""
    tasks = {k: v for k, v in adapters(variant).items() if k in ("ptune", "kv", "soft", "cart", "mpt2")}
    engine = Engine(model_dir_for(variant), device="cpu", dtype=dtype, block_size=4)
    for name, path in tasks.items():
        engine.add_prompt(name, path)
    assert engine.prompts.get("kv").kv.dtype == dtype
    assert_generation_matches(engine, hf_peft_reference(model_dir_for(variant), tasks, dtype=dtype), requests(tasks))


@pytest.mark.parametrize("task", ["kv", "cart"])
def test_prefix_kv_is_what_peft_puts_in_the_cache(task, adapters, model_dir_for):
    """The stored K/V of layer l are PEFT's past key/values of layer l (keys not rotated)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d = model_dir_for("llama")
    path = adapters("llama")[task]
    engine = Engine(d, device="cpu", dtype="float32")
    kv = engine.add_prompt("kv", path).kv
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d), str(path)).eval()
    cache = peft_model.get_prompt(batch_size=1)
    for layer in range(engine.config.num_layers):
        keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]  # [kv_heads, P, head_dim]
        torch.testing.assert_close(kv[layer, 0], keys.transpose(0, 1), rtol=0, atol=0)
        torch.testing.assert_close(kv[layer, 1], values.transpose(0, 1), rtol=0, atol=0)


@pytest.mark.parametrize("task, task_id", [("cpt", None), ("mpt0", 0), ("mpt2", 2)])
def test_prompt_rows_are_what_peft_prepends(task, task_id, adapters, model_dir_for):
    """CPT's rows, and a multitask adapter's task rows (shared rows x the task's low-rank matrix), are PEFT's
    `get_prompt` for that task, to float32 rounding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    d = model_dir_for("llama")
    spec = adapters("llama")[task]
    engine = Engine(d, device="cpu", dtype="float32")
    rows = engine.add_prompt(task, spec).embeds
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(d), str(spec).partition("#")[0]).eval()
    extra = {} if task_id is None else {"task_ids": torch.tensor([task_id])}
    with torch.no_grad():
        want = peft_model.get_prompt(batch_size=1, **extra)[0]
    torch.testing.assert_close(rows, want, rtol=1e-6, atol=1e-6)


def test_multitask_adapter_tasks_are_picked_by_task_id_or_suffix(adapters, model_dir_for, tmp_path):
    d = model_dir_for("llama")
    mpt = adapters("llama")["mpt2"].partition("#")[0]
    engine = Engine(d, device="cpu", dtype="float32")
    by_kwarg = engine.add_prompt("a", mpt, task_id=2)
    by_suffix = engine.add_prompt("b", f"{mpt}#2")
    other = engine.add_prompt("c", mpt, task_id=1)
    assert by_kwarg.version == by_suffix.version != other.version
    assert by_suffix.source == f"{mpt}#2" and torch.equal(by_kwarg.embeds, by_suffix.embeds)
    for source, kwargs, message in [
        (mpt, {}, "of 3 tasks: pick one with task_id"),
        (mpt, {"task_id": 3}, "task_id 3 is not one of the adapter's 3 tasks"),
        (f"{mpt}#7", {}, "task_id 7 is not one of"),
        (f"{mpt}#1", {"task_id": 2}, "names task 1 but task_id=2"),
        (adapters("llama")["kv"], {"task_id": 0}, "this one is PREFIX_TUNING"),
        (f"{adapters('llama')['soft']}#0", {}, "this one is PROMPT_TUNING"),
        (torch.zeros(2, 64), {"task_id": 0}, "not of a tensor"),
    ]:
        with pytest.raises(PromptError, match=message):
            engine.add_prompt("a", source, replace=True, **kwargs)
        assert engine.prompts.get("a") is by_kwarg
    with pytest.raises(PromptError, match="give its directory"):
        engine.add_prompt("t", text="hello", task_id=0)
    one = build_multitask_prompt_tuning_adapter(d, tmp_path / "one", num_virtual_tokens=3, num_tasks=1)
    assert engine.add_prompt("one", one).length == 3  # a single task needs no id
    cfg_cols = load_file(str(Path(mpt) / "adapter_model.safetensors"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((Path(mpt) / "adapter_config.json").read_text())
    save_file({"prompt_embeddings": cfg_cols["prompt_embeddings"],
               "prefix_task_cols": cfg_cols["prefix_task_cols"][:, :2].contiguous(),
               "prefix_task_rows": cfg_cols["prefix_task_rows"]}, str(bad / "adapter_model.safetensors"))
    with pytest.raises(PromptError, match="shapes do not fit"):
        engine.add_prompt("bad", bad, task_id=0)
    assert "bad" not in engine.prompts


def test_prefix_tuning_prompts_survive_eviction_and_replacement(adapters, model_dir_for):
    """A pool too small for every task's prefix at once: prefix-tuning K/V are evicted and written again on the
    next use, and a new version replaces the old one; tokens stay the reference path's."""
    d = model_dir_for("llama")
    tasks = adapters("llama")
    kw = dict(device="cpu", dtype="float32", block_size=4)
    ref = Engine(d, backend="reference", **kw)
    bytes_per_block = KVPool.bytes_per_block(ref.config, 4, torch.float32)
    engine = Engine(d, kv_cache_bytes=12 * bytes_per_block, max_num_seqs=2, **kw)
    for e in (ref, engine):
        for name, path in tasks.items():
            e.add_prompt(name, path)
    reqs = requests(list(tasks) * 2, seed=3, max_new_tokens=4)
    assert [o.token_ids for o in engine.generate(reqs)] == [o.token_ids for o in ref.generate(reqs)]
    assert engine.prefix_cache.stats.evictions > 0
    other = build_prefix_tuning_adapter(d, tasks["kv"].parent / "kv_v2", num_virtual_tokens=7, seed=9)
    for e in (ref, engine):
        e.add_prompt("kv", other, replace=True)
    reqs = requests(["kv", "kv_proj"], seed=4, max_new_tokens=4)
    assert [o.token_ids for o in engine.generate(reqs)] == [o.token_ids for o in ref.generate(reqs)]
    assert_no_leaks(engine)


def _edited(adapter_dir, tmp_path, config=None, weights=None):
    out = tmp_path / "edited"
    out.mkdir()
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    cfg.update(config or {})
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    if weights is not None:
        tensors["prompt_embeddings"] = weights(tensors["prompt_embeddings"]).contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def _nan_row(w):
    w = w.clone()
    w[1, 3] = float("nan")
    return w


@pytest.mark.parametrize(
    "config, weights, message",
    [
        ({"num_layers": 3}, lambda w: torch.cat([w, w[:, :64]], 1), "for a model of 3 layers; this model has 2"),
        ({"num_attention_heads": 4, "token_dim": 64}, lambda w: w.repeat(1, 2), "with 4 key/value heads"),
        ({"token_dim": 16}, None, "num_layers=2 and token_dim=16 give rows of width 64"),
        ({"token_dim": None, "num_layers": None}, lambda w: w[:, :-8], "prefix-tuning rows of width 120"),
        ({}, _nan_row, "contains NaN or Inf"),
        ({"num_virtual_tokens": 4}, None, "num_virtual_tokens=4"),
        ({"peft_type": "MULTITASK_PROMPT_TUNING"}, None, "needs prefix_task_cols and prefix_task_rows"),
        ({"peft_type": "ADAPTION_PROMPT"}, None, "types PROMPT_TUNING, P_TUNING, CPT"),
    ],
)
def test_bad_prefix_adapters_are_refused_and_change_nothing(config, weights, message, adapters, model_dir_for,
                                                            tmp_path):
    engine = Engine(model_dir_for("llama"), device="cpu", dtype="float32")
    engine.add_prompt("t", adapters("llama")["kv"])
    before = engine.prompts.get("t")
    with pytest.raises(PromptError, match=message):
        engine.add_prompt("t", _edited(adapters("llama")["kv"], tmp_path, config, weights), replace=True)
    assert engine.prompts.get("t") is before


def test_prefix_adapter_of_another_model_is_refused(tmp_path, model_dir_for):
    deeper = build_tiny_checkpoint("llama", tmp_path / "deeper", num_layers=3, with_tokenizer=False)
    adapter = build_prefix_tuning_adapter(deeper, tmp_path / "adapter", num_virtual_tokens=4)
    engine = Engine(model_dir_for("llama"), device="cpu", dtype="float32")
    with pytest.raises(PromptError, match="3 layers; this model has 2"):
        engine.add_prompt("t", adapter)
    assert "t" not in engine.prompts


@pytest.mark.parametrize("variant, why", [("deepseek_v3", "latent attention"),
                                          ("gemma4", "layers differ in K/V head width or count"),
                                          ("mimo_v2_flash", "layers differ in K/V head width or count, or its "
                                                            "values are narrower than its keys")])
def test_prefix_tuning_where_it_cannot_apply_is_refused_naming_why(variant, why, tmp_path, model_dir_for,
                                                                   adapter_for):
    """DeepSeek's latent attention keeps no per-head K/V for a prefix adapter to replace (HF + PEFT fail on one);
    Gemma 4's full-attention layers have other K/V shapes than its sliding ones, and PEFT provisions a prefix for the
    widest and skips the layers it does not fit, which the engine does not reproduce (MiMo-V2-Flash's sliding layers
    have twice the K/V heads, and its values are narrower than its keys). The engine refuses it naming
    that, before any state changes, serves its other prompts on, and `softprompt train` refuses the method."""
    from softprompt.engine.datasets import Example
    from softprompt.engine.errors import SoftPromptError
    from softprompt.engine.train import TrainConfig, train_prompt

    d = model_dir_for(variant)
    adapter = build_prefix_tuning_adapter(d, tmp_path / "kv", num_virtual_tokens=4)
    engine = Engine(d, device="cpu", dtype="float32")
    engine.add_prompt("soft", adapter_for(variant))
    with pytest.raises(PromptError, match=f"{why}.* prompt tuning, P-tuning or CPT"):
        engine.add_prompt("kv", adapter)
    assert "kv" not in engine.prompts
    assert engine.generate([Request(prompt="soft", input_ids=[5, 6, 7], sampling=SamplingParams(max_new_tokens=3))])
    with pytest.raises(SoftPromptError, match=f"prefix_tuning: {engine.config.model_type}'s {why}"):
        train_prompt(d, [Example("a cat", "sat")], None, tmp_path / "out", TrainConfig(method="prefix_tuning"))


def test_verify_checks_every_prompt_learning_type(adapters, model_dir_for):
    tasks = {k: v for k, v in adapters("gpt2").items() if k in ("ptune", "kv", "soft", "cart", "mpt2")}
    report = verify(model_dir_for("gpt2"), tasks, backends=["torch"], dtype="float32", device="cpu",
                    random_per_task=2, max_new_tokens=4)
    assert report.oracle == "hf+peft" and report.exit_code() == 0, report.summary()
    assert set(report.backends["torch"].tasks) == {"ptune", "kv", "soft", "cart", "mpt2", "base"}


def test_prompt_logprobs_equal_hf_peft(adapters, model_dir_for):
    """Engine.prompt_logprobs (what the server's echo returns) against HF + PEFT's log-softmax, for a soft
    prompt and a prefix-tuning adapter."""
    d = model_dir_for("llama")
    tasks = {k: v for k, v in adapters("llama").items() if k in ("soft", "kv")}
    engine = Engine(d, device="cpu", dtype="float32")
    for name, path in tasks.items():
        engine.add_prompt(name, path)
    hf = hf_peft_reference(d, tasks)
    ids = [1, 40, 41, 42, 7, 300]
    for task in (*tasks, None):
        got = engine.prompt_logprobs(task, ids, top_n=3)
        want = torch.log_softmax(hf.logits(task, ids), -1)
        assert got[0] is None and len(got) == len(ids)
        for i, lp in enumerate(got[1:]):
            assert lp.token_id == ids[i + 1] and abs(lp.logprob - float(want[i, ids[i + 1]])) < 1e-4
            assert list(lp.top) == want[i].topk(3).indices.tolist()
