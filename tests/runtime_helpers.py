"""Shared helpers for runtime tests: request builders and pool-accounting checks."""

from __future__ import annotations

import torch

from softprompt import Engine, Request, SamplingParams
from softprompt.testing import build_prompt_tensor


def register_tasks(engines: list[Engine], num_tasks: int, hidden: int | None = None, base_len: int = 3) -> list[str]:
    """The same tasks (random soft prompts of varied lengths, one text prompt) in every engine. `hidden`: the
    prompts' width (default: the model's token-embedding width)."""
    hidden = hidden or engines[0].config.embedding_width
    names = []
    for t in range(num_tasks):
        name = f"task{t}"
        for e in engines:
            if t == 1 and e.tokenizer is not None:
                e.add_prompt(name, text="the quick dog sat on the mat")
            else:
                e.add_prompt(name, build_prompt_tensor(hidden, base_len + (t * 5) % 19, seed=t))
        names.append(name)
    return names


def make_requests(names: list[str | None], n: int, seed: int = 0, max_new_tokens: int = 8, **sampling) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(1, 40, (1,), generator=g))
        ids = torch.randint(4, 512, (length,), generator=g).tolist()
        params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **sampling)
        out.append({"prompt": names[i % len(names)], "input_ids": ids, "sampling": params})
    return out


def run(engine: Engine, specs: list[dict]) -> list[list[int]]:
    return [o.token_ids for o in engine.generate([Request(**s) for s in specs])]


def assert_no_leaks(engine: Engine) -> None:
    """Every block is free, held by an idle cached prefix or an idle cached request block; no request holds
    anything."""
    assert not engine.has_unfinished_requests()
    assert engine.kv_is_idle()
    assert len(set(engine.pool._free)) == len(engine.pool._free)  # no block freed twice
    if engine.pool.states is not None:  # recurrent states: only the cached prompts' are kept
        assert engine.pool.states.num_held == len(engine.prefix_cache.entries)


def assert_quantized_logits_match_hf_peft(checkpoint, unquantized, adapter, hf) -> None:
    """A quantized checkpoint's fp32 reference logits with `adapter` equal HF + PEFT's (`hf`, loaded from it) within
    1e-4 at 23 tokens, and move more than 1e-2 from the unquantized checkpoint's (the test can fail)."""
    import peft

    engine = Engine(checkpoint, device="cpu", dtype="float32", backend="reference")
    prompt = engine.add_prompt("task", adapter)
    ids = torch.randint(4, 512, (23,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        expected = peft.PeftModel.from_pretrained(hf, adapter).eval()(input_ids=torch.tensor([ids])).logits
    got = engine.reference.logits(prompt.embeds, ids)
    torch.testing.assert_close(got, expected[0, -len(ids):].float(), atol=1e-4, rtol=0)
    plain = Engine(unquantized, device="cpu", dtype="float32", backend="reference")
    assert (plain.reference.logits(plain.add_prompt("task", adapter).embeds, ids) - got).abs().max() > 1e-2
