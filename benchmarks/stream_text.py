"""Host time of a request's text while it streams: S requests each reading their text (a streaming server's
chunk) and checking stop strings after every one of L generated tokens. Incremental detokenization
(engine/detokenizer.py: the new token's piece from a short window) against decoding every generated token again
at each read, which is what the engine did before (HF's decode, O(L) a token), in the same run on the same ids.

    python -m benchmarks.stream_text [--streams 256] [--tokens 256] [--tokenizer DIR] [--out FILE.json]

The ids are real text encoded by the tokenizer (the test BPE unless --tokenizer names a checkpoint's), so each
request's text is what a model would stream.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from softprompt.engine.detokenizer import IncrementalText, earliest_stop
from softprompt.engine.testing import _corpus, build_tokenizer
from softprompt.engine.tokenizer import Tokenizer, load_tokenizer

from .environment import device_name, git_commit

STOPS = ("never in this text", "\n\n\n\n")


def request_ids(tokenizer: Tokenizer, streams: int, tokens: int) -> list[list[int]]:
    """`streams` id lists of `tokens` ids, each a window of one long encoded text starting at another place."""
    text = " ".join(_corpus())
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < 2 * tokens:
        ids = ids + ids
    step = max(1, (len(ids) - tokens) // streams)
    return [ids[(i * step) % (len(ids) - tokens):][:tokens] for i in range(streams)]


def run(tokenizer: Tokenizer, ids: list[list[int]], incremental: bool, stops: bool) -> float:
    """Seconds for every stream to read its text (and check stop strings) after each of its tokens. The whole
    decode is done once a token, the stop check and the text sharing it, as the engine did."""
    lives: list[list[int]] = [[] for _ in ids]
    texts = [IncrementalText(tokenizer, live) for live in lives] if incremental else None
    start = time.perf_counter()
    for n in range(len(ids[0])):
        for k, (live, all_ids) in enumerate(zip(lives, ids)):
            live.append(all_ids[n])
            if incremental:
                if stops:
                    assert texts[k].find_stop(STOPS, 0) is None
                texts[k].text()
            else:
                text = tokenizer.decode(live)
                if stops:
                    assert earliest_stop(text, STOPS) is None
    return time.perf_counter() - start


def measure(tokenizer: Tokenizer, streams: int, tokens: int, rounds: int = 3) -> dict[str, Any]:
    ids = request_ids(tokenizer, streams, tokens)
    check = [IncrementalText(tokenizer, list(x)).text() for x in ids[:8]]
    assert check == [tokenizer.decode(x) for x in ids[:8]], "incremental text differs from HF's decode"
    result: dict[str, Any] = {"streams": streams, "tokens": tokens, "stops": list(STOPS),
                              "decode_stream": tokenizer.decode_stream() is not None}
    for stops in (False, True):
        case = "text + stop strings" if stops else "text"
        best = {}
        for _ in range(rounds):  # the variants alternate; best of the rounds
            for name, incremental in (("incremental", True), ("whole decode", False)):
                seconds = run(tokenizer, ids, incremental, stops)
                best[name] = min(best.get(name, seconds), seconds)
        result[case] = {name: {"total_s": s, "per_step_ms": s / tokens * 1e3} for name, s in best.items()}
        result[case]["speedup"] = best["whole decode"] / best["incremental"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream_text", description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=256, help="requests streaming at once (default 256)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens each generates (default 256)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="a checkpoint directory's tokenizer")
    parser.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.streams < 1 or args.tokens < 1:
        print("error: --streams and --tokens must be >= 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(args.tokenizer or build_tokenizer(tmp))
    if tokenizer is None:
        print(f"error: {args.tokenizer} has no tokenizer files", file=sys.stderr)
        return 2
    result = measure(tokenizer, args.streams, args.tokens)
    name = str(args.tokenizer) if args.tokenizer else "the test byte-level BPE (vocab 512)"
    mode = "DecodeStream" if result["decode_stream"] else "a window over HF's decode"
    print(f"text of {args.streams} streams x {args.tokens} tokens, read after every token; tokenizer: {name}, "
          f"incremental by {mode} ({device_name('cpu')}, best of 3, the variants alternate in this run):")
    for case in ("text", "text + stop strings"):
        r = result[case]
        print(f"  {case:<20} incremental {r['incremental']['per_step_ms']:7.2f} ms/step, whole decode "
              f"{r['whole decode']['per_step_ms']:7.2f} ms/step: {r['speedup']:.1f}x")
    if args.out is not None:
        result.update(device=device_name("cpu"), git_commit=git_commit(), tokenizer=name,
                      command=" ".join(["python -m benchmarks.stream_text", *(argv or sys.argv[1:])]))
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
