"""Loading checkpoints: sharded, half precision, and clear errors for broken or unsupported ones."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.errors import CheckpointError, UnsupportedModelError
from softprompt.engine.loader import load_model
from softprompt.engine.reference import ReferencePath
from softprompt.testing import build_tiny_checkpoint


def test_sharded_checkpoint_loads_identically(tmp_path, model_dir_for):
    sharded = build_tiny_checkpoint("llama", tmp_path / "sharded", seed=0, shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    single = build_tiny_checkpoint("llama", tmp_path / "single", seed=0)
    a, b = load_model(sharded, "cpu", "float32"), load_model(single, "cpu", "float32")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize("saved", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wanted", ["float32", "bfloat16"])
def test_half_precision_checkpoints_cast_on_load(tmp_path, saved, wanted):
    d = build_tiny_checkpoint("gpt2", tmp_path / "m", dtype=saved)
    model = load_model(d, "cpu", wanted)
    assert model.word_embeddings.weight.dtype == getattr(torch, wanted)
    assert torch.isfinite(ReferencePath(model).logits(None, [5, 6, 7])).all()


def test_auto_dtype_is_fp32_on_cpu(tmp_path):
    d = build_tiny_checkpoint("bloom", tmp_path / "m", dtype=torch.bfloat16)
    assert load_model(d, "cpu", None).word_embeddings.weight.dtype == torch.float32


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe", "olmoe", "granitemoe", "glm4_moe",
                                     "ernie4_5_moe", "deepseek_v3", "deepseek_v2", "dots1",
                                     "granitemoeshared", "flex_olmo"])
def test_moe_experts_stacked_in_3d_tensors_load_alike(variant, tmp_path, model_dir_for):
    """transformers 5 holds a MoE layer's experts in two 3-D tensors (`mlp.experts.gate_up_proj`, `down_proj`;
    GraniteMoE's under `block_sparse_moe`); a checkpoint written from that state dict as it is loads as the one HF
    saves (per expert, or GraniteMoE's `input_linear` / `output_linear`)."""
    from transformers import AutoModelForCausalLM

    d = model_dir_for(variant)
    stacked = tmp_path / "stacked"
    shutil.copytree(d, stacked)
    (stacked / "model.safetensors").unlink()
    state = AutoModelForCausalLM.from_pretrained(d).state_dict()
    assert any(k.endswith("experts.gate_up_proj") and v.dim() == 3 for k, v in state.items())
    save_file({k: v.clone() for k, v in state.items()}, stacked / "model.safetensors")  # (clones: tied embeddings)
    ids = [5, 9, 13, 40, 7]
    want = ReferencePath(load_model(d, "cpu", "float32")).logits(None, ids)
    assert torch.equal(ReferencePath(load_model(stacked, "cpu", "float32")).logits(None, ids), want)


def test_tied_embeddings_share_storage(model_dir_for):
    model = load_model(model_dir_for("qwen2"), "cpu", "float32")
    assert model.lm_head.weight.data_ptr() == model.word_embeddings.weight.data_ptr()


def test_every_supported_model_type_has_a_config_reader_and_a_model_class():
    from softprompt.engine.config import ARCH_FAMILIES, FAMILY_CONFIGS
    from softprompt.engine.models import MODEL_CLASSES

    assert set(ARCH_FAMILIES.values()) == set(FAMILY_CONFIGS) == set(MODEL_CLASSES)


def test_unsupported_architecture(tmp_path, model_dir_for):
    d = tmp_path / "m"
    shutil.copytree(model_dir_for("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "rwkv", ["RwkvForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="rwkv"):
        load_model(d, "cpu")


def test_weights_go_from_disk_into_the_model_one_at_a_time(tmp_path, monkeypatch):
    """The loader holds one checkpoint tensor in host memory at a time (each read when its turn comes, cast, put in
    the model and dropped), not the whole checkpoint: every tensor read is gone before the next two are read."""
    import gc
    import weakref

    from softprompt.engine import loader
    from softprompt.testing import build_tiny_checkpoint

    d = build_tiny_checkpoint("llama", tmp_path / "m", dtype=torch.bfloat16, num_layers=3, with_tokenizer=False)
    read: list[weakref.ref] = []
    most_alive = 0
    real = loader.CheckpointTensors.__getitem__

    def tracked(self, key):
        nonlocal most_alive
        gc.collect()
        most_alive = max(most_alive, sum(ref() is not None for ref in read))
        tensor = real(self, key)
        read.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(loader.CheckpointTensors, "__getitem__", tracked)
    model = load_model(d, "cpu", torch.float32)  # (bf16 on disk: every tensor read is cast, so none is kept)
    assert len(read) == len(list(model.named_parameters())) >= 20 and most_alive <= 1


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "fbgemm_fp8", "compressed-tensors"])
def test_quantized_checkpoints_are_refused_naming_the_method(method, tmp_path, model_dir_for):
    d = tmp_path / "m"
    shutil.copytree(model_dir_for("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=f"quantized checkpoint.*{method}"):
        load_model(d, "cpu")


def test_falcon_with_alibi_is_refused_naming_it(tmp_path, model_dir_for):
    d = tmp_path / "m"
    shutil.copytree(model_dir_for("falcon_serial"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["alibi"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="alibi=True"):
        load_model(d, "cpu")


@pytest.mark.parametrize("field, value, match", [
    ("hidden_size_per_layer_input", 16, "per-layer input embeddings"),  # Gemma 4 E2B / E4B
    ("use_bidirectional_attention", "all", "not a causal LM")])
def test_gemma4_options_we_do_not_serve_are_refused_by_name(field, value, match, tmp_path, model_dir_for):
    d = tmp_path / "m"
    shutil.copytree(model_dir_for("gemma4"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=match):
        load_model(d, "cpu")


def test_gemma4_layers_sharing_kv_leave_their_own_kv_weights_unread(tmp_path, model_dir_for):
    """A Gemma 4 layer that attends with an earlier layer's K/V has no K/V projections of its own; a checkpoint that
    still holds them (transformers ignores them on load) loads, and they are not read."""
    from safetensors.torch import load_file

    source = model_dir_for("gemma4_unified")
    d = tmp_path / "m"
    shutil.copytree(source, d)
    weights = load_file(d / "model.safetensors")
    extra = {f"model.layers.5.self_attn.{name}.weight": torch.full_like(weights[f"model.layers.3.self_attn.{name}."
                                                                                "weight"], 7.0)
             for name in ("k_proj", "k_norm")}
    save_file({**weights, **extra}, d / "model.safetensors", metadata={"format": "pt"})
    ids = list(range(5, 17))
    want = Engine(source, device="cpu", dtype="float32", backend="reference").reference.logits(None, ids)
    got = Engine(d, device="cpu", dtype="float32", backend="reference").reference.logits(None, ids)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_a_rope_per_layer_type_needs_a_family_that_rotates_by_layer(monkeypatch, model_dir_for):
    """A family whose forward rotates with one RoPE for all layers refuses a checkpoint with a RoPE per layer type,
    rather than rotating every layer with the first type's."""
    from softprompt.engine.models.olmo2 import Olmo2ForCausalLM

    monkeypatch.setattr(Olmo2ForCausalLM, "per_layer_rope", False)
    with pytest.raises(UnsupportedModelError, match="RoPE per layer type"):
        load_model(model_dir_for("olmo3"), "cpu")


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nope", "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "empty", "cpu")


def _copy(model_dir_for, tmp_path, variant="llama"):
    d = tmp_path / "m"
    shutil.copytree(model_dir_for(variant), d)
    return d


def test_multi_token_prediction_layers_are_left_out_and_the_router_bias_kept_in_fp32(tmp_path, model_dir_for):
    """GLM-4.5 checkpoints hold `num_nextn_predict_layers` extra layers after the last (speculative decoding), which
    transformers skips: so does the loader, and only those. The router's score-correction bias stays fp32 in a
    half-precision model, as transformers keeps it (and its weight too from transformers 5.24 on)."""
    from safetensors.torch import load_file

    from softprompt.engine.config import hf_router_weights_in_fp32

    src = model_dir_for("glm4_moe")
    d = tmp_path / "mtp"
    shutil.copytree(src, d)
    config = json.loads((d / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["num_hidden_layers"] == 3
    weights = load_file(d / "model.safetensors")
    weights["model.layers.3.eh_proj.weight"] = torch.ones(8, 8)
    weights["model.layers.3.mlp.gate.weight"] = torch.ones(8, 64)
    save_file(weights, d / "model.safetensors")
    ids = [5, 9, 13, 40, 7]
    want = ReferencePath(load_model(src, "cpu", "float32")).logits(None, ids)
    assert torch.equal(ReferencePath(load_model(d, "cpu", "float32")).logits(None, ids), want)
    half = load_model(d, "cpu", "bfloat16").model.layers[1].mlp.gate
    assert half.weight.dtype == (torch.float32 if hf_router_weights_in_fp32() else torch.bfloat16)
    assert half.e_score_correction_bias.dtype == torch.float32
    weights["model.layers.4.eh_proj.weight"] = torch.ones(8, 8)  # past the prediction layers: not the model's
    save_file(weights, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="layers.4.eh_proj"):
        load_model(d, "cpu")


def test_ernie_moe_router_kept_in_fp32_and_its_prediction_block_left_out(tmp_path, model_dir_for):
    """ERNIE 4.5 MoE keeps its routers' weights and correction biases in fp32 (as transformers does) and its
    checkpoints' multi-token-prediction block (`mtp_*`) is not part of the model."""
    from safetensors.torch import load_file

    src = model_dir_for("ernie4_5_moe")
    d = tmp_path / "mtp"
    shutil.copytree(src, d)
    weights = load_file(d / "model.safetensors")
    weights["model.mtp_linear_proj.0.weight"] = torch.ones(8, 8)
    save_file(weights, d / "model.safetensors")
    model = load_model(d, "cpu", "bfloat16")
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[1].mlp.experts[0].up_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.up_proj.bias is not None and model.lm_head.bias is not None  # (use_bias)


@pytest.mark.parametrize("variant", ["exaone_moe", "mellum"])
def test_mtp_prediction_blocks_left_out(variant, tmp_path, model_dir_for):
    """EXAONE-MoE's and Mellum's checkpoints hold a multi-token-prediction block (`mtp.*`), which transformers leaves
    out; so does the loader. EXAONE-MoE's score-correction bias sits on the MoE block beside its router (kept in
    fp32)."""
    from safetensors.torch import load_file

    src = model_dir_for(variant)
    d = tmp_path / "mtp"
    shutil.copytree(src, d)
    weights = load_file(d / "model.safetensors")
    weights["mtp.layers.0.eh_proj.weight"] = torch.ones(8, 8)
    save_file(weights, d / "model.safetensors")
    ids = [5, 9, 13, 40, 7]
    want = ReferencePath(load_model(src, "cpu", "float32")).logits(None, ids)
    assert torch.equal(ReferencePath(load_model(d, "cpu", "float32")).logits(None, ids), want)
    if variant == "exaone_moe":
        assert "model.layers.1.mlp.e_score_correction_bias" in weights
        assert load_model(d, "cpu", "bfloat16").model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_missing_weights_named(tmp_path, model_dir_for):
    d = _copy(model_dir_for, tmp_path)
    from safetensors.torch import load_file

    weights = load_file(d / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="layers.1.mlp.up_proj"):
        load_model(d, "cpu")


def test_wrong_shape_named(tmp_path, model_dir_for):
    d = _copy(model_dir_for, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(d, "cpu")


def test_truncated_safetensors(tmp_path, model_dir_for):
    d = _copy(model_dir_for, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(d, "cpu")


def test_pickle_weights_are_refused(tmp_path, model_dir_for):
    d = _copy(model_dir_for, tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(d, "cpu")


def test_shard_index_cannot_escape_directory(tmp_path, model_dir_for):
    d = _copy(model_dir_for, tmp_path)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../evil.safetensors"}}))
    with pytest.raises(CheckpointError, match="outside"):
        load_model(d, "cpu")


def test_nan_weights_rejected(tmp_path, model_dir_for):
    d = _copy(model_dir_for, tmp_path, "gpt2")
    from safetensors.torch import load_file

    weights = load_file(d / "model.safetensors")
    key = next(k for k in weights if k.endswith("ln_f.weight"))
    weights[key][0] = float("nan")
    save_file(weights, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="NaN"):
        load_model(d, "cpu")


def test_bad_device_and_dtype(model_dir_for):
    with pytest.raises(CheckpointError, match="dtype"):
        Engine(model_dir_for("llama"), device="cpu", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(CheckpointError, match="CUDA"):
            Engine(model_dir_for("llama"), device="cuda")


def test_engine_without_tokenizer_works_on_ids(tmp_path):
    d = build_tiny_checkpoint("llama", tmp_path / "m", with_tokenizer=False)
    engine = Engine(d, device="cpu")
    assert engine.tokenizer is None
    from softprompt import Request, SamplingParams
    from softprompt.engine.errors import RequestError

    out = engine.generate([Request(input_ids=[5, 6, 7], sampling=SamplingParams(max_new_tokens=3))])[0]
    assert len(out.token_ids) == 3 and out.text is None
    with pytest.raises(RequestError, match="tokenizer"):
        engine.generate([Request(text="hello")])


def test_generation_config_eos_ids_stop_requests_as_in_hf_generate(tmp_path, model_dir_for):
    """An end-of-turn id listed only in generation_config.json (Llama 3 Instruct's <|eot_id|>) stops a request, as
    HF's generate stops there; a malformed file is named."""
    from transformers import AutoModelForCausalLM

    d = shutil.copytree(model_dir_for("llama"), tmp_path / "m")
    ids = [5, 6, 7]
    free = Engine(d, device="cpu", dtype="float32").generate(
        [Request(input_ids=ids, sampling=SamplingParams(max_new_tokens=8, ignore_eos=True))])[0].token_ids
    turn_end = free[3]
    config = json.loads((d / "config.json").read_text())
    assert turn_end not in (config["eos_token_id"], *range(4))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [config["eos_token_id"], turn_end]}))
    engine = Engine(d, device="cpu", dtype="float32")
    assert turn_end in engine.eos_token_ids and config["eos_token_id"] in engine.eos_token_ids
    out = engine.generate([Request(input_ids=ids, sampling=SamplingParams(max_new_tokens=8))])[0]
    assert out.token_ids == free[:free.index(turn_end) + 1] and out.stop_reason == turn_end
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, 3, dtype=torch.long), do_sample=False,
                           max_new_tokens=8, pad_token_id=0)[0, 3:].tolist()
    assert out.token_ids == want
    for bad in ('{"eos_token_id": "x"}', "[1, 2]", "{not json"):
        (d / "generation_config.json").write_text(bad)
        with pytest.raises(CheckpointError, match="generation_config.json"):
            Engine(d, device="cpu")


def test_phi3_fused_weights_partial_rotary_and_longrope_cap(tmp_path, model_dir_for):
    model = load_model(model_dir_for("phi3_longrope"), "cpu")
    c = model.config
    assert (c.max_positions, c.rotary_dim, c.head_dim) == (128, 12, 16)  # longrope: its original positions
    assert model.rope_tables is None  # partial rotary: the model rotates q/k itself, not the triton kernels
    assert load_model(model_dir_for("phi3"), "cpu").rope_tables is not None
    d = _copy(model_dir_for, tmp_path, "phi3")
    from safetensors.torch import load_file

    weights = load_file(d / "model.safetensors")
    weights["model.layers.0.self_attn.qkv_proj.weight"] = weights["model.layers.0.self_attn.qkv_proj.weight"][:-1]
    save_file(weights, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="layers.0.self_attn.qkv_proj"):
        load_model(d, "cpu")
