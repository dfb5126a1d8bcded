"""The `softprompt` command (also `python -m softprompt`)."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import SoftPromptError
from .reasoning import REASONING_PARSERS

EXTERNAL_COMMANDS = (
    ("serve", "server.cli", "the OpenAI-compatible HTTP server (needs the server extra)"),
    ("bench", "bench_cli", "throughput/serving benchmarks vs HF and PEFT (from a clone)"),
    ("train", "train", "train a soft prompt (PEFT prompt-tuning adapter) on a JSONL dataset over a frozen model"),
    ("eval", "evaluate", "evaluate many prompts (soft, text or none) on one dataset in one batched run"),
    ("verify", "verify", "check every backend against HF transformers + PEFT on your checkpoint and adapters"),
    ("run-batch", "server.batch", "run a JSONL file of OpenAI batch requests offline, as vLLM's run-batch"),
)


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto")
    p.add_argument("--backend", default="auto", help="auto, torch, triton, reference")
    p.add_argument("--enforce-eager", action="store_true",
                   help="triton backend: launch decode steps eagerly instead of replaying CUDA graphs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softprompt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="serve several soft prompts in one batch on a tiny random model (CPU)")
    demo.add_argument("--workdir", default=None, help="where to build the tiny checkpoint (default: a temp dir)")
    demo.add_argument("--tasks", type=int, default=4)
    demo.add_argument("--requests", type=int, default=16)
    demo.add_argument("--max-new-tokens", type=int, default=16)
    _add_engine_args(demo)

    gen = sub.add_parser("generate", help="generate from a checkpoint with optional soft prompts")
    gen.add_argument("model_dir", help="a Hugging Face checkpoint directory, or a Hub model id "
                     "(org/name or org/name@revision)")
    gen.add_argument("--prompt", action="append", default=[], metavar="NAME=SOURCE",
                     help="register a prompt: NAME=ADAPTER_DIR, NAME=FILE.safetensors or NAME=ORG/ADAPTER (a Hub "
                     "adapter id) (repeatable); NAME=ADAPTER_DIR#N is task N of a multitask prompt-tuning adapter")
    gen.add_argument("--text-prompt", action="append", default=[], metavar="NAME=TEXT",
                     help="register a text (hard) prompt (repeatable)")
    gen.add_argument("--max-model-len", type=int, default=None,
                     help="the most positions a sequence may take (prompt + input + output); default: the model's")
    gen.add_argument("--task", default=None, help="prompt name to use (default: none)")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="input text (needs the checkpoint's tokenizer)")
    src.add_argument("--ids", help="input token ids, comma-separated")
    src.add_argument("--chat", metavar="MESSAGE", help="a user message, through the tokenizer's chat template")
    gen.add_argument("--system", default=None, help="with --chat: a system message before it")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--frequency-penalty", type=float, default=0.0)
    gen.add_argument("--presence-penalty", type=float, default=0.0)
    gen.add_argument("--min-tokens", type=int, default=0)
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="a stop string (repeatable)")
    gen.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID",
                     help="a stop token id (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true", help="go on past EOS")
    gen.add_argument("--allowed-token-ids", default=None, metavar="IDS",
                     help="only these token ids may be generated, comma-separated")
    gen.add_argument("--choice", action="append", default=None, metavar="TEXT",
                     help="the output is one of these texts (repeatable; guided_choice)")
    gen.add_argument("--json-schema", default=None, metavar="SCHEMA",
                     help="the output follows this JSON schema: its JSON text, or @FILE (guided_json; needs xgrammar)")
    gen.add_argument("--json-object", action="store_true", help="the output is JSON (JSON mode; needs xgrammar)")
    gen.add_argument("--regex", default=None, help="the output matches this regular expression (needs xgrammar)")
    gen.add_argument("--grammar", default=None, metavar="EBNF",
                     help="the output follows this EBNF (GBNF) grammar: its text, or @FILE (needs xgrammar)")
    gen.add_argument("--compact-json", action="store_true",
                     help="JSON outputs without free whitespace (disable_any_whitespace)")
    gen.add_argument("--reasoning-parser", choices=sorted(REASONING_PARSERS), default=None,
                     help="a thinking model's constraint (--choice, --json-schema, --regex, ...) holds on its answer "
                     "after the <think> part, not on the thought")
    gen.add_argument("--beam-width", type=int, default=None, metavar="K",
                     help="beam search (HF's generate(num_beams=K)): print the K best hypotheses, best first")
    gen.add_argument("--length-penalty", type=float, default=1.0,
                     help="with --beam-width: a hypothesis scores sum(logprobs) / length ** this")
    gen.add_argument("--early-stopping", choices=("false", "true", "never"), default="false",
                     help="with --beam-width: HF's early-stopping rule")
    gen.add_argument("--truncate-prompt-tokens", type=int, default=None, metavar="K",
                     help="keep only the input's last K tokens (-1: as many as fit)")
    gen.add_argument("--bad-word", action="append", default=[], metavar="TEXT",
                     help="a word never to generate (repeatable)")
    gen.add_argument("--include-stop-str", action="store_true",
                     help="keep the stop string (or the stop token's text) in the output text")
    gen.add_argument("--keep-special-tokens", action="store_true", help="keep special tokens' text in the output")
    gen.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_engine_args(gen)

    # subcommands living in their own modules: (name, module, help); each module has add_<x>_arguments/run_<x>
    for name, module, help_text in EXTERNAL_COMMANDS:
        mod = importlib.import_module(f"{__package__}.{module}")
        getattr(mod, f"add_{name.replace('-', '_')}_arguments")(sub.add_parser(name, help=help_text))
    return parser


def _split_pair(value: str, flag: str) -> tuple[str, str]:
    name, sep, rest = value.partition("=")
    if not sep or not name or not rest:
        raise SoftPromptError(f"{flag} expects NAME=VALUE, got {value!r}")
    return name, rest


def _text_or_file(value: str | None, flag: str) -> str | None:
    """A flag's value as given, or the text of the file named after an @."""
    if value is None or not value.startswith("@"):
        return value
    try:
        return Path(value[1:]).read_text()
    except OSError as exc:
        raise SoftPromptError(f"{flag}: cannot read {value[1:]!r}: {exc.strerror}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from .api import Engine
    from .request import Request
    from .sampling import SamplingParams

    engine = Engine(args.model_dir, device=args.device, dtype=args.dtype, backend=args.backend,
                    cuda_graphs=False if args.enforce_eager else None, max_model_len=args.max_model_len,
                    reasoning_parser=args.reasoning_parser)
    for item in args.prompt:
        name, source = _split_pair(item, "--prompt")
        engine.add_prompt(name, source)
    for item in args.text_prompt:
        name, text = _split_pair(item, "--text-prompt")
        engine.add_prompt(name, text=text)
    allowed = None if args.allowed_token_ids is None else _int_list(args.allowed_token_ids, "--allowed-token-ids")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                            presence_penalty=args.presence_penalty, min_tokens=args.min_tokens,
                            stop=args.stop, stop_token_ids=args.stop_token_id, ignore_eos=args.ignore_eos,
                            include_stop_str_in_output=args.include_stop_str,
                            skip_special_tokens=not args.keep_special_tokens, allowed_token_ids=allowed,
                            guided_choice=args.choice, bad_words=args.bad_word,
                            guided_json=_text_or_file(args.json_schema, "--json-schema"),
                            guided_json_object=args.json_object, guided_regex=args.regex,
                            guided_grammar=_text_or_file(args.grammar, "--grammar"),
                            disable_any_whitespace=args.compact_json,
                            truncate_prompt_tokens=args.truncate_prompt_tokens)
    if args.system is not None and args.chat is None:
        raise SoftPromptError("--system goes with --chat")
    if args.ids is not None:
        given = {"input_ids": _int_list(args.ids, "--ids")}
    elif args.chat is not None:
        system = [] if args.system is None else [{"role": "system", "content": args.system}]
        given = {"messages": [*system, {"role": "user", "content": args.chat}]}
    else:
        given = {"text": args.text}
    if args.beam_width is not None:
        return _beam_search(engine, Request(prompt=args.task, **given), params, args)
    out = engine.generate([Request(prompt=args.task, **given, sampling=params)])[0]
    if args.json:
        print(json.dumps({"prompt": out.prompt, "prompt_version": out.prompt_version, "token_ids": out.token_ids,
                          "text": out.text, "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}))
    else:
        print(out.text if out.text is not None else " ".join(map(str, out.token_ids)))
    return 0


def _beam_search(engine, request, params, args: argparse.Namespace) -> int:
    """--beam-width: the request's best hypotheses, best first (a sampling option would change the search:
    refused, naming it)."""
    from .beam_search import BeamSearchParams, conflicting_sampling_field

    conflict = conflicting_sampling_field(params)
    if conflict is not None:
        raise SoftPromptError(f"--beam-width does not go with the sampling option {conflict}")
    beam = BeamSearchParams(args.beam_width, max_new_tokens=params.max_new_tokens,
                            length_penalty=args.length_penalty,
                            early_stopping={"false": False, "true": True}.get(args.early_stopping, "never"),
                            ignore_eos=params.ignore_eos, skip_special_tokens=params.skip_special_tokens)
    [out] = engine.beam_search(request, beam)
    for seq in out.sequences:
        if args.json:
            print(json.dumps({"prompt": out.prompt, "token_ids": seq.token_ids, "text": seq.text, "score": seq.score,
                              "cumulative_logprob": seq.cumulative_logprob, "finish_reason": seq.finish_reason}))
        else:
            text = seq.text if seq.text is not None else " ".join(map(str, seq.token_ids))
            print(f"{seq.score:.4f}\t{text}")
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise SoftPromptError(f"{flag} must be comma-separated integers ({exc})") from exc


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            return run_demo(args)
        if args.command == "generate":
            return cmd_generate(args)
        module = dict((name, module) for name, module, _ in EXTERNAL_COMMANDS)[args.command]
        run = f"run_{args.command.replace('-', '_')}"
        return getattr(importlib.import_module(f"{__package__}.{module}"), run)(args)
    except SoftPromptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
