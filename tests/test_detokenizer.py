"""Incremental detokenization (engine/detokenizer.py) against HF's decode of every token, and stop strings through
the engine against the reference path, which decodes everything at each check."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.detokenizer import (
    REPLACEMENT,
    ContinuedText,
    IncrementalText,
    earliest_stop,
    exact_stop,
    input_context,
)
from softprompt.engine.tokenizer import Tokenizer
from softprompt.testing import build_tokenizer

WORDS = ["▁", "▁the", "▁cat", "a", "b", "▁sat", ".", ",", "▁on", "é", "日本", "▁'", "s", "n't", "▁?", "▁▁"]


def _fast(tok: RustTokenizer, **specials) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=specials.pop("cleanup", False),
                                   **specials)


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """Llama 2 / Mistral's layout: ▁ for spaces, byte-fallback tokens <0xNN>, the first space stripped."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    vocab.update({w: len(vocab) + i for i, w in enumerate(WORDS)})
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return _fast(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def metaspace() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({w: len(vocab) + i for i, w in enumerate(WORDS)})
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    return _fast(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def wordpiece(cleanup: bool) -> PreTrainedTokenizerFast:
    """BERT's layout; with cleanup, transformers removes spaces before punctuation in Python after decoding."""
    pieces = ["the", "cat", "##s", "sat", ".", ",", "?", "'", "n", "##'t", "don", "a", "##b", "!"]
    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, **{w: 3 + i for i, w in enumerate(pieces)}}
    tok = RustTokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
    return _fast(tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", eos_token="[SEP]", cleanup=cleanup)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, PreTrainedTokenizerFast]:
    bpe_dir = build_tokenizer(tmp_path_factory.mktemp("bpe"))
    return {"byte_level": AutoTokenizer.from_pretrained(str(bpe_dir)), "sentencepiece": sentencepiece_like(),
            "metaspace": metaspace(), "wordpiece": wordpiece(False), "wordpiece_cleanup": wordpiece(True)}


def wrap(hf, stream: bool) -> Tokenizer:
    tok = Tokenizer(hf)
    if not stream:
        tok.__dict__["_decode_stream_factory"] = None  # the window over HF's decode, as for any other tokenizer
    return tok


def check_prefixes(tok: Tokenizer, ids: list[int], reads: list[int], byte_runs: bool = False,
                   input_ids: list[int] = ()) -> None:
    """Read the text at the lengths in `reads` (in any order): each equals the exact text of that many ids after
    the input (HF's decode, `ContinuedText`), less a trailing incomplete character. `byte_runs`: only where that
    text has no U+FFFD at all."""
    live: list[int] = []
    text = IncrementalText(tok, live, input_ids=input_ids)
    exact = ContinuedText(tok.decode, input_ids)
    for n in sorted(set(reads)):
        live.extend(ids[len(live):n])
    for n in reads:
        got, full = text.text(n), exact(ids[:n])
        if byte_runs and REPLACEMENT in full:
            continue
        if full.endswith(REPLACEMENT):
            assert full.startswith(got), (ids[:n], got, full)
        else:
            assert got == full, (ids[:n], got, full)


def test_which_tokenizers_step_a_decode_stream(tokenizers):
    assert Tokenizer(tokenizers["byte_level"]).decode_stream() is not None
    assert Tokenizer(tokenizers["sentencepiece"]).decode_stream() is not None
    assert Tokenizer(tokenizers["wordpiece_cleanup"]).decode_stream() is None  # clean-up runs in Python


@pytest.mark.parametrize("name", ["byte_level", "metaspace", "wordpiece"])
@pytest.mark.parametrize("stream", [True, False], ids=["decode_stream", "window"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_ids_give_hf_decodes_text(tokenizers, name, stream, data):
    """Random ids, special and out-of-vocabulary ones included, and for the byte-level BPE lone bytes that make
    incomplete or invalid UTF-8."""
    hf = tokenizers[name]
    ids = data.draw(st.lists(st.integers(0, len(hf) + 3), max_size=40))
    input_ids = data.draw(st.lists(st.integers(0, len(hf) + 3), max_size=30))
    reads = data.draw(st.lists(st.integers(0, len(ids)), max_size=12)) + [len(ids)]
    check_prefixes(wrap(hf, stream), ids, reads, input_ids=input_ids)


@pytest.mark.parametrize("stream", [True, False], ids=["decode_stream", "window"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.sampled_from(list("the cat sat on.,?'é日本🙂ab ")), max_size=40), data=st.data())
def test_byte_fallback_text_gives_hf_decodes_text(tokenizers, stream, text, data):
    """SentencePiece byte fallback decodes a run of <0xNN> tokens as one: while the run is not valid UTF-8 (one
    character complete, the next not yet), HF's decode turns every byte of it into U+FFFD, the complete character's
    too, and the stream holds on to what it gave. Where HF's decode has no U+FFFD the texts are equal, which the
    final text of real text always is (a request's final text is HF's decode whatever the ids: tested below)."""
    hf = tokenizers["sentencepiece"]
    ids = hf(text, add_special_tokens=False)["input_ids"]
    cut = data.draw(st.integers(0, len(ids)))  # the first `cut` tokens are the input
    reads = data.draw(st.lists(st.integers(0, len(ids) - cut), max_size=12)) + [len(ids) - cut]
    assert REPLACEMENT not in hf.decode(ids)
    check_prefixes(wrap(hf, stream), ids[cut:], reads, byte_runs=True, input_ids=ids[:cut])


@pytest.mark.parametrize("name", ["byte_level", "sentencepiece", "metaspace", "wordpiece"])
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_text_continues_the_input_as_hf_pipelines_give_it(tokenizers, name, data):
    """HF's text-generation pipeline (return_full_text=False) decodes input + output and drops the input's text:
    the same text wherever the input's text has no U+FFFD (the context is the input's last tokens only)."""
    hf = tokenizers[name]
    tok = Tokenizer(hf)
    input_ids = data.draw(st.lists(st.integers(3, len(hf) - 1), min_size=1, max_size=30))
    ids = data.draw(st.lists(st.integers(0, len(hf) - 1), max_size=20))
    before = tok.decode(input_ids)
    whole = tok.decode(input_ids + ids)
    if REPLACEMENT in before or not whole.startswith(before) or REPLACEMENT in tok.decode(input_ids[-23:]):
        return
    assert ContinuedText(tok.decode, input_ids)(ids) == whole[len(before):]


def test_a_sentencepiece_first_token_keeps_its_space_after_the_input(tokenizers):
    hf = tokenizers["sentencepiece"]
    tok = Tokenizer(hf)
    the, cat, sat = hf.convert_tokens_to_ids(["▁the", "▁cat", "▁sat"])
    assert tok.decode([cat, sat]) == "cat sat"  # HF's decode of the output alone drops the space
    for stream in (True, False):
        live = [cat, sat]
        assert IncrementalText(wrap(hf, stream), live, input_ids=[the]).text() == " cat sat"
    assert ContinuedText(tok.decode, [the])([cat, sat]) == " cat sat"
    assert ContinuedText(tok.decode, [])([cat, sat]) == "cat sat"  # no input: nothing to continue
    assert input_context(tok.decode, [the] * 30) == ([the] * 4, "the the the the")
    lone = hf.convert_tokens_to_ids("<0xE6>")  # an incomplete character: no clean context ends with it
    assert input_context(tok.decode, [the, the, lone]) == ([], "")


def test_a_python_clean_up_across_the_window_edge_keeps_the_text_already_out(tokenizers):
    """With clean_up_tokenization_spaces, HF turns " ' " into "'" once the word after the quote arrives; the stream
    gave " '" already, so it keeps it (as vLLM does), and the final text (HF's decode) has no spaces there."""
    hf = tokenizers["wordpiece_cleanup"]
    tok = Tokenizer(hf)
    ids = hf("? ' the cat .", add_special_tokens=False)["input_ids"]
    live: list[int] = []
    text = IncrementalText(tok, live)
    seen = []
    for i in ids:
        live.append(i)
        seen.append(text.text())
    assert seen == ["?", "? '", "? ' the", "? ' the cat", "? ' the cat."] and tok.decode(ids) == "?'the cat."


def test_earliest_stop_and_the_min_tokens_floor():
    assert earliest_stop("abcabc", ["bc", "ca"]) == (1, "bc")
    assert earliest_stop("abcabc", ["bc", "ab"]) == (0, "ab")
    assert earliest_stop("xxab", ["ab", "xab"]) == (1, "xab")  # earliest start wins
    assert earliest_stop("abab", ["ab"], floor=2) == (2, "ab")  # must end after the floor
    assert earliest_stop("abab", ["ab"], floor=1) == (0, "ab")  # ends at 2, after 1
    assert earliest_stop("abab", ["ab"], floor=4) is None
    decode = "".join
    assert exact_stop(decode, list("abcab"), ["ab"], min_tokens=2) == ((3, "ab"), "abcab")
    assert exact_stop(decode, list("abcab"), ["ab"], min_tokens=0) == ((0, "ab"), "abcab")


def test_find_stop_looks_at_new_text_only_and_confirms_on_the_whole_decode(tokenizers):
    tok = Tokenizer(tokenizers["byte_level"])
    ids = tok.encode("the cat sat on the mat", add_special_tokens=False)
    calls = []
    decode = tok.decode
    tok.decode = lambda x: calls.append(len(x)) or decode(x)
    live: list[int] = []
    text = IncrementalText(tok, live)
    hits = []
    for i in ids:
        live.append(i)
        hits.append(text.find_stop(["cat"], 0))
        if hits[-1] is not None:
            assert text.final == decode(live)
    first = next(k for k, h in enumerate(hits) if h is not None)
    assert hits[first] == (4, "cat") and "cat" not in decode(ids[:first])
    assert calls == [first + 1]  # the whole decode ran once, to confirm the hit
    assert hits[first + 1:] == [None] * (len(ids) - first - 1)  # later checks look past it
    calls.clear()
    live.clear()
    text = IncrementalText(tok, live)
    for i in ids:  # "cat" is in the first min_tokens tokens' text: never a hit, nor a whole decode to confirm one
        live.append(i)
        if len(live) >= first + 1:
            assert text.find_stop(["cat"], first + 1) is None
    assert calls == []


# ---- through the engine -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(model_dir_for):
    d = model_dir_for("llama")
    return (Engine(d, device="cpu", dtype="float32", max_batched_tokens=64),
            Engine(d, device="cpu", dtype="float32", backend="reference"))


def test_streamed_text_grows_by_pieces_and_the_final_text_is_hf_decode(engines):
    engine, _ = engines
    decode = engine.tokenizer.decode
    g = torch.Generator().manual_seed(0)
    requests = [Request(input_ids=torch.randint(4, 500, (int(n),), generator=g).tolist(),
                        sampling=SamplingParams(max_new_tokens=24, ignore_eos=True, temperature=1.5, seed=i))
                for i, n in enumerate(torch.randint(1, 20, (6,), generator=g))]
    last: dict[str, str] = {}
    for out in engine.stream(requests):
        text, full = out.text, decode(out.token_ids)
        if out.finished:
            assert text == full
        else:
            assert full.startswith(text) and (text == full or full.endswith(REPLACEMENT))
            assert text.startswith(last.get(out.request_id, ""))  # a stream's text only grows
        last[out.request_id] = text
    assert len(last) == len(requests)


def test_stop_strings_equal_the_reference_path(engines):
    """Stop strings taken from free runs' texts (across token edges, at the start, repeated, with min_tokens), all
    in one batch: tokens, text, finish and stop reasons as the reference path gives them."""
    engine, reference = engines
    rng = random.Random(0)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randint(4, 500, (int(n),), generator=g).tolist() for n in torch.randint(1, 16, (8,), generator=g)]
    free = engine.generate([Request(input_ids=ids, sampling=SamplingParams(max_new_tokens=20, ignore_eos=True))
                            for ids in inputs])
    requests = []
    for ids, out in zip(inputs, free):
        text = out.text
        for k in range(3):
            start = rng.randrange(max(1, len(text) - 2))
            stops = [text[start:start + rng.randint(1, 4)], "never there"]
            if k == 2:
                stops.append(text[:2])  # in the first tokens' text: min_tokens must let it pass
            requests.append(Request(input_ids=ids, sampling=SamplingParams(
                max_new_tokens=20, ignore_eos=True, stop=[s for s in stops if s], min_tokens=[0, 3, 6][k],
                include_stop_str_in_output=k == 1)))
    got, want = engine.generate(requests), reference.generate(requests)
    fields = [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in got]
    wanted = [(o.token_ids, o.text, o.finish_reason, o.stop_reason) for o in want]
    for r, a, b in zip(requests, fields, wanted):
        assert a == b, (r.sampling.stop, r.sampling.min_tokens, a, b)
    assert sum(o.finish_reason == "stop" for o in got) >= len(got) // 2


def test_a_stop_string_in_the_first_min_tokens_text_does_not_stop_later(engines):
    engine, reference = engines
    ids = [5, 6, 7]
    free = engine.generate([Request(input_ids=ids, sampling=SamplingParams(max_new_tokens=12, ignore_eos=True))])[0]
    early = engine.tokenizer.decode(free.token_ids[:2])
    stop = early[-2:] if len(early) >= 2 else early
    rest = engine.tokenizer.decode(free.token_ids)[len(engine.tokenizer.decode(free.token_ids[:4])):]
    if not stop or stop in rest:
        pytest.skip("the stop string comes again later in this text")
    for eng in (engine, reference):
        out = eng.generate([Request(input_ids=ids, sampling=SamplingParams(max_new_tokens=12, ignore_eos=True,
                                                                           stop=[stop], min_tokens=4))])[0]
        assert out.finish_reason == "length" and out.text == free.text


def test_text_is_decoded_only_when_read_and_a_stream_never_decodes_everything(engines):
    engine, _ = engines
    decode, calls = engine.tokenizer.decode, []
    engine.tokenizer.decode = lambda ids: calls.append(len(ids)) or decode(ids)
    try:
        params = SamplingParams(max_new_tokens=6, ignore_eos=True)
        outs = list(engine.stream(Request(input_ids=[5, 6, 7], sampling=params)))
        assert len(outs) == 6 and calls == []
        texts = [o.text for o in outs]
        # the input's context once, then only the finished output decodes all its tokens (after that context);
        # the running outputs' text comes from stepping a DecodeStream
        assert calls == [3, 3 + 6]
        assert texts[-1] == decode(outs[-1].token_ids) and all(texts[-1].startswith(t) for t in texts)
        calls.clear()
        list(engine.stream(Request(input_ids=[5, 6, 7], sampling=SamplingParams(
            max_new_tokens=6, ignore_eos=True, stop=["never in this text"]))))
        assert calls == [3]  # the stop check read only the new pieces
    finally:
        engine.tokenizer.decode = decode


def test_the_text_leaves_out_what_stopped_the_request_unless_asked(engines):
    """vLLM's include_stop_str_in_output: a stop string or a stop token's text is left out of the text by default
    (the token stays in token_ids) and kept when asked; the reference path agrees."""
    engine, reference = engines
    decode = engine.tokenizer.decode
    free = engine.generate([Request(input_ids=[5, 6, 7], sampling=SamplingParams(max_new_tokens=10,
                                                                                 ignore_eos=True))])[0]
    k = next(k for k in range(2, 10) if decode(free.token_ids[k:k + 1]).strip())  # a token with visible text
    token = free.token_ids[k]
    k = free.token_ids.index(token)
    stop = decode(free.token_ids[:k + 1])[-1]
    for eng in (engine, reference):
        by_token = [eng.generate([Request(input_ids=[5, 6, 7], sampling=SamplingParams(
            max_new_tokens=10, ignore_eos=True, stop_token_ids=[token], include_stop_str_in_output=keep))])[0]
            for keep in (False, True)]
        assert [o.token_ids for o in by_token] == [free.token_ids[:k + 1]] * 2
        assert [o.text for o in by_token] == [decode(free.token_ids[:k]), decode(free.token_ids[:k + 1])]
        by_text = [eng.generate([Request(input_ids=[5, 6, 7], sampling=SamplingParams(
            max_new_tokens=10, ignore_eos=True, stop=[stop], include_stop_str_in_output=keep))])[0]
            for keep in (False, True)]
        cut = free.text.find(stop)
        assert [o.text for o in by_text] == [free.text[:cut], free.text[:cut + 1]]
        assert by_text[0].stop_reason == stop and by_text[0].finish_reason == "stop"


def test_special_tokens_text_is_kept_when_asked(engines):
    """skip_special_tokens=False: <s> (a special token, forced by logit_bias) is in the text, streamed and final, and
    a stop string can match it."""
    engine, reference = engines
    forced = dict(max_new_tokens=4, ignore_eos=True, logit_bias={1: 100.0})
    for eng in (engine, reference):
        skipped, kept, stopped = eng.generate([
            Request(input_ids=[5, 6], sampling=SamplingParams(**forced)),
            Request(input_ids=[5, 6], sampling=SamplingParams(**forced, skip_special_tokens=False)),
            Request(input_ids=[5, 6], sampling=SamplingParams(**forced, skip_special_tokens=False, stop=["s><"],
                                                              min_tokens=2))])
        assert skipped.token_ids == kept.token_ids == [1] * 4
        assert skipped.text == "" and kept.text == "<s>" * 4
        # "<s><s>" (the first min_tokens) holds "s><" already: only the one that ends after it counts
        assert stopped.token_ids == [1] * 3 and stopped.text == "<s><" and stopped.stop_reason == "s><"
    streamed = [o.text for o in engine.stream(Request(input_ids=[5, 6], sampling=SamplingParams(
        **forced, skip_special_tokens=False)))]
    assert streamed == ["<s>", "<s><s>", "<s><s><s>", "<s>" * 4]


def test_engine_text_continues_the_input_with_a_sentencepiece_tokenizer(tmp_path, model_dir_for, tokenizers):
    """A Llama 2 / Mistral style tokenizer: the completion after "the" is " cat sat" (as vLLM and HF's pipeline
    give it), streamed and final, on both paths, so that input + completion reads as one text."""
    import shutil

    d = shutil.copytree(model_dir_for("llama"), tmp_path / "m")
    for f in d.glob("tokenizer*"):
        f.unlink()
    hf = tokenizers["sentencepiece"]
    hf.save_pretrained(d)
    the, cat, sat = hf.convert_tokens_to_ids(["▁the", "▁cat", "▁sat"])
    params = SamplingParams(max_new_tokens=4, choice_token_ids=[[cat, sat]])
    for backend in ("torch", "reference"):
        engine = Engine(d, device="cpu", dtype="float32", backend=backend)
        outs = list(engine.stream(Request(input_ids=[the], sampling=params)))
        assert [o.text for o in outs][-1] == " cat sat" and outs[-1].token_ids == [cat, sat]
        assert engine.generate([Request(text="the", sampling=params)])[0].text == " cat sat"
    assert [o.text for o in outs] == [" cat sat"]  # the reference path: one output, when it finishes
    engine = Engine(d, device="cpu", dtype="float32")
    assert [o.text for o in engine.stream(Request(input_ids=[the], sampling=params))] == [" cat", " cat sat"]
