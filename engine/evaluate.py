"""`softprompt eval`: score many prompts (soft, text or none) on one dataset in one batched engine run."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .datasets import Example, dataset_hash, load_pairs
from .errors import SoftPromptError
from .hub import hub_prompt_name

MODES = ("generate", "score")
METRICS = ("accuracy", "f1", "bleu", "rouge")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
NO_PROMPT = "none"
TEXT_PREFIX = "text:"


class EvalError(SoftPromptError):
    """Bad evaluation input: a prompt spec, mode, label set, metric or ensemble."""


@dataclass(frozen=True)
class EvalConfig:
    mode: str = "generate"  # "generate": greedy text; "score": the label with the highest log-likelihood
    labels: tuple[str, ...] | None = None  # classification label set (stripped); needed by "score"
    max_new_tokens: int = 8
    metrics: tuple[str, ...] = METRICS
    ensembles: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> member prompt names

    def validate(self) -> None:
        if self.mode not in MODES:
            raise EvalError(f"unknown mode {self.mode!r}; choose one of {MODES}")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown or not self.metrics:
            raise EvalError(f"unknown metric(s) {unknown or self.metrics!r}; choose from {METRICS}")
        if self.mode == "score" and not self.labels:
            raise EvalError("mode 'score' needs a label set (--labels a,b,c)")
        if self.labels is not None and (len(set(self.labels)) != len(self.labels) or not all(self.labels)):
            raise EvalError(f"labels must be distinct and non-empty, got {list(self.labels)}")
        if self.max_new_tokens < 1:
            raise EvalError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class EvalEntry:
    name: str
    kind: str  # "none" | "text" | "peft" | "tensor" | "ensemble"
    version: str | list[str] | None  # the prompt version measured; for an ensemble its members' name@version
    metrics: dict[str, float]
    n: int
    predictions: list[str]


@dataclass
class EvalReport:
    mode: str
    dataset_hash: str
    n: int
    labels: list[str] | None
    primary_metric: str
    entries: list[EvalEntry]

    def ranking(self) -> list[EvalEntry]:
        return sorted(self.entries, key=lambda e: -e.metrics[self.primary_metric])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- metrics -----------------------------------------------------------------------------------------
def accuracy(predictions: list[str], references: list[str]) -> float:
    return sum(p == r for p, r in zip(predictions, references)) / max(len(references), 1)


def macro_f1(predictions: list[str], references: list[str], labels: list[str]) -> float:
    """Unweighted mean over `labels` of per-label F1 (0 where undefined); predictions outside the set are misses."""
    scores = []
    for label in labels:
        tp = sum(p == label and r == label for p, r in zip(predictions, references))
        fp = sum(p == label and r != label for p, r in zip(predictions, references))
        fn = sum(p != label and r == label for p, r in zip(predictions, references))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def bleu(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure over the examples (rouge_score's default tokenizer, no stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for p, r in zip(predictions, references):
        for key, score in scorer.score(r, p).items():
            totals[key] += score.fmeasure
    return {k: v / max(len(references), 1) for k, v in totals.items()}


def compute_metrics(predictions: list[str], references: list[str], metrics: tuple[str, ...],
                    labels: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    if "accuracy" in metrics:
        out["accuracy"] = accuracy(predictions, references)
    if "f1" in metrics:
        out["f1"] = macro_f1(predictions, references, labels)
    if "bleu" in metrics:
        out["bleu"] = bleu(predictions, references)
    if "rouge" in metrics:
        out.update(rouge(predictions, references))
    return out


def to_label(text: str, labels: list[str] | None) -> str:
    """Stripped text, cut to the longest label it starts with (generation runs past a one-word label)."""
    text = text.strip()
    if labels:
        hits = [lab for lab in labels if text == lab or text.startswith(lab + " ") or text.startswith(lab + "\n")
                or (text.startswith(lab) and not text[len(lab)].isalnum())]
        if hits:
            return max(hits, key=len)
    return text


def vote(member_predictions: list[str], member_scores: list[dict[str, float]] | None = None) -> str:
    """Majority vote; ties go to the highest summed score (score mode), else to the first member's pick."""
    counts = Counter(member_predictions)
    top = max(counts.values())
    tied = [p for p in dict.fromkeys(member_predictions) if counts[p] == top]  # member order
    if len(tied) > 1 and member_scores:
        return max(tied, key=lambda lab: sum(s.get(lab, float("-inf")) for s in member_scores))
    return tied[0]


# ---- prompts -----------------------------------------------------------------------------------------
def register_prompts(engine, prompts: dict[str, Any]) -> dict[str, tuple[str | None, str, str | None]]:
    """Register each spec; -> name -> (engine prompt name or None, kind, version).

    Spec: None or "none" (the bare model), "text:TEXT" (a hard prompt), or an adapter dir / .safetensors path.
    A name already in the engine gets a new version (replace=True)."""
    out = {}
    for name, spec in prompts.items():
        if spec is None or spec == NO_PROMPT:
            out[name] = (None, NO_PROMPT, None)
            continue
        if not isinstance(spec, (str, Path)):
            raise EvalError(f"prompt {name!r}: spec must be a path, 'text:...' or 'none', got {type(spec).__name__}")
        spec = str(spec)
        if spec.startswith(TEXT_PREFIX):
            text = spec[len(TEXT_PREFIX):]
            if not text:
                raise EvalError(f"prompt {name!r}: empty text after 'text:'")
            prompt = engine.add_prompt(name, text=text, replace=True)
        else:
            if not Path(spec).exists() and hub_prompt_name(spec) is None:
                raise EvalError(f"prompt {name!r}: {spec!r} is neither an existing adapter dir / .safetensors file, "
                                "a Hub adapter id, 'text:TEXT' nor 'none'")
            prompt = engine.add_prompt(name, spec, replace=True)
        out[name] = (name, prompt.kind, engine.prompts.get(name).version)
    return out


def _label_forms(labels: list[str], examples: list[Example]) -> list[str]:
    """The continuation scored for each label: a target's exact surface form (e.g. ' fruit') when one matches."""
    surface = {ex.target.strip(): ex.target for ex in examples}
    return [surface.get(lab, lab) for lab in labels]


def score_labels(engine, contexts: list[tuple[str | None, str]], continuations: list[str],
                 max_logit_floats: int = 1 << 26) -> list[list[float]]:
    """engine.score() for every (prompt, context) x continuation, batched (engine/scoring.py: each context computed
    once for all its continuations), in chunks of at most `max_logit_floats` fp32 logits (one for small runs)."""
    from .scoring import score_continuations
    from .tokenizer import require_tokenizer

    tok = require_tokenizer(engine.tokenizer, "score mode")
    conts = [tok.encode(c, add_special_tokens=False) for c in continuations]
    if any(not c for c in conts):
        raise EvalError("a label tokenizes to no tokens")
    items = []
    for prompt, text in contexts:
        ctx = tok.encode(text)
        soft = None if prompt is None else engine.prompts.get(prompt)
        plen = 0 if soft is None else soft.length
        if plen + len(ctx) + max(map(len, conts)) > engine.config.max_positions:
            raise EvalError(f"input {text[:40]!r} + label after a {plen}-token prompt exceeds the model's "
                            f"{engine.config.max_positions} positions")
        items.append((soft, ctx, conts))
    per_chunk = max(1, max_logit_floats // engine.config.vocab_size // sum(map(len, conts)))  # contexts a chunk
    return [scores for start in range(0, len(items), per_chunk)
            for scores in score_continuations(engine, items[start:start + per_chunk])]


# ---- evaluation --------------------------------------------------------------------------------------
def evaluate_prompts(engine, prompts: dict[str, Any], examples: list[Example], mode: str = "generate",
                     labels: list[str] | tuple[str, ...] | None = None, max_new_tokens: int = 8,
                     metrics: tuple[str, ...] = METRICS,
                     ensembles: dict[str, tuple[str, ...] | list[str]] | None = None) -> EvalReport:
    """Evaluate every prompt on `examples` in one batched run: generate mode sends every prompt's requests in ONE
    engine.generate call; score mode scores every (prompt, example, label) in one engine.sequence_logits pass
    (chunked only when the logits would be huge)."""
    from .request import Request
    from .sampling import SamplingParams

    config = EvalConfig(mode, None if labels is None else tuple(l.strip() for l in labels), max_new_tokens,
                        tuple(metrics), {k: tuple(v) for k, v in (ensembles or {}).items()})
    config.validate()
    if not prompts:
        raise EvalError("no prompts to evaluate")
    if not examples:
        raise EvalError("no examples to evaluate on")
    for ens, members in config.ensembles.items():
        if ens in prompts:
            raise EvalError(f"ensemble name {ens!r} is also a prompt name")
        missing = [m for m in members if m not in prompts]
        if len(members) < 2 or missing:
            raise EvalError(f"ensemble {ens!r} needs >= 2 evaluated prompts; unknown: {missing}")
    label_list = list(config.labels) if config.labels else None
    references = [ex.target.strip() for ex in examples]
    registered = register_prompts(engine, prompts)

    predictions: dict[str, list[str]] = {}
    scores: dict[str, list[dict[str, float]]] | None = None
    if mode == "generate":
        params = SamplingParams(max_new_tokens=max_new_tokens)
        order = [(name, i) for name in prompts for i in range(len(examples))]
        requests = [Request(prompt=registered[name][0], text=examples[i].input, sampling=params) for name, i in order]
        outputs = engine.generate(requests)  # one batched run over every prompt and example
        for (name, _), out in zip(order, outputs):
            predictions.setdefault(name, []).append(to_label(out.text or "", label_list))
    else:
        contexts = [(registered[name][0], ex.input) for name in prompts for ex in examples]
        flat = score_labels(engine, contexts, _label_forms(label_list, examples))
        scores = {}
        for k, name in enumerate(prompts):
            per_example = [dict(zip(label_list, row)) for row in flat[k * len(examples):(k + 1) * len(examples)]]
            scores[name] = per_example
            predictions[name] = [max(s, key=s.get) for s in per_example]

    f1_labels = label_list or sorted(set(references))
    entries = [EvalEntry(name, kind, version, compute_metrics(predictions[name], references, config.metrics,
                                                               f1_labels), len(examples), predictions[name])
               for name, (_, kind, version) in registered.items()]
    for ens, members in config.ensembles.items():
        voted = [vote([predictions[m][i] for m in members], None if scores is None else [scores[m][i] for m in members])
                 for i in range(len(examples))]
        versions = [f"{m}@{registered[m][2]}" if registered[m][2] else m for m in members]
        entries.append(EvalEntry(ens, "ensemble", versions,
                                 compute_metrics(voted, references, config.metrics, f1_labels), len(examples), voted))
    primary = "accuracy" if "accuracy" in config.metrics else next(iter(entries[0].metrics))
    return EvalReport(mode, dataset_hash(examples), len(examples), label_list, primary, entries)


# ---- output ------------------------------------------------------------------------------------------
def format_table(report: EvalReport) -> str:
    keys = list(report.entries[0].metrics)
    header = ["rank", "prompt", "kind", "version"] + keys
    rows = [header]
    for rank, e in enumerate(report.ranking(), start=1):
        version = e.version if isinstance(e.version, str) or e.version is None else "+".join(e.version)
        rows.append([str(rank), e.name, e.kind, str(version or "-")] + [f"{e.metrics[k]:.4f}" for k in keys])
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows)


def write_plot(report: EvalReport, path: Path) -> Path | None:
    """One bar chart per metric, prompts in ranking order; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ranked = report.ranking()
    keys = list(ranked[0].metrics)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.bar([e.name for e in ranked], [e.metrics[key] for e in ranked], color="tab:blue")
        ax.set_title(key)
        ax.set_ylim(0, 100 if key == "bleu" else 1)  # sacrebleu's 0-100 scale; the rest are fractions
        ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---- CLI ---------------------------------------------------------------------------------------------
def _csv(value: str | None) -> list[str] | None:
    return None if value is None else [x.strip() for x in value.split(",") if x.strip()]


def parse_prompt_specs(items: list[str]) -> dict[str, str | None]:
    """NAME=ADAPTER_DIR | NAME=FILE.safetensors | NAME=text:TEXT | NAME=none | none (named 'none')."""
    out: dict[str, str | None] = {}
    for item in items:
        if item == NO_PROMPT:
            name, spec = NO_PROMPT, None
        else:
            name, sep, spec = item.partition("=")
            if not sep or not name or not spec:
                raise EvalError(f"--prompts expects NAME=ADAPTER_DIR, NAME=FILE.safetensors, NAME=text:TEXT or "
                                f"'none', got {item!r}")
            spec = None if spec == NO_PROMPT else spec
        if name in out:
            raise EvalError(f"prompt name {name!r} given twice in --prompts")
        out[name] = spec
    return out


def parse_ensembles(items: list[str]) -> dict[str, list[str]]:
    out = {}
    for item in items:
        name, sep, members = item.partition("=")
        if not sep or not name or not _csv(members):
            raise EvalError(f"--ensemble expects NAME=P1,P2,..., got {item!r}")
        out[name] = _csv(members)
    return out


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="a Hugging Face checkpoint directory, or a Hub model id "
                        "(org/name or org/name@revision)")
    parser.add_argument("--data", required=True, metavar="FILE.jsonl", help='one {"input": ..., "target": ...} a line')
    parser.add_argument("--prompts", nargs="+", default=[], metavar="SPEC",
                        help="NAME=ADAPTER_DIR, NAME=FILE.safetensors, NAME=ORG/ADAPTER (a Hub adapter id), "
                        "NAME=text:TEXT, NAME=none or none")
    parser.add_argument("--mode", choices=MODES, default="generate",
                        help="generate: greedy text vs target; score: highest log-likelihood label (needs --labels)")
    parser.add_argument("--labels", default=None, help="comma-separated label set (classification)")
    parser.add_argument("--metrics", default=",".join(METRICS), help=f"comma-separated subset of {','.join(METRICS)}")
    parser.add_argument("--ensemble", action="append", default=[], metavar="NAME=P1,P2",
                        help="majority vote over these prompts' predictions (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--sweep-length", default=None, metavar="P1,P2,...",
                        help="train one prompt per length on --train-data (softprompt train's defaults, --epochs) "
                             "and evaluate them with the other prompts in the same batched run")
    parser.add_argument("--train-data", default=None, metavar="FILE.jsonl", help="training set for --sweep-length")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs for --sweep-length")
    parser.add_argument("--out", required=True, metavar="DIR", help="writes eval.json and eval.png here")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto")
    parser.add_argument("--backend", default="auto", help="auto, torch, triton, reference")


def sweep_lengths(args: argparse.Namespace, root: Path) -> dict[str, str]:
    """Train one soft prompt per length of --sweep-length; returns their specs (name -> adapter dir)."""
    from .train import TrainConfig, train_prompt

    if not args.train_data:
        raise EvalError("--sweep-length needs --train-data FILE.jsonl")
    try:
        lengths = [int(x) for x in _csv(args.sweep_length)]
    except ValueError as exc:
        raise EvalError(f"--sweep-length must be comma-separated integers, got {args.sweep_length!r}") from exc
    if not lengths or min(lengths) < 1:
        raise EvalError(f"--sweep-length needs lengths >= 1, got {args.sweep_length!r}")
    train = load_pairs(args.train_data)
    specs = {}
    for p in lengths:
        out_dir = root / f"P{p}"
        config = TrainConfig(num_virtual_tokens=p, epochs=args.epochs, device=args.device, dtype=args.dtype)
        train_prompt(args.model_dir, train, None, out_dir, config, log=lambda *a, **k: None)
        specs[f"sweep-P{p}"] = str(out_dir)
        print(f"trained a {p}-token prompt into {out_dir}")
    return specs


def run_eval(args: argparse.Namespace) -> int:
    """`softprompt eval`: prints the ranking, writes DIR/eval.json and DIR/eval.png; 0 on success."""
    from .api import Engine

    prompts = parse_prompt_specs(args.prompts) if args.prompts else {}
    ensembles = parse_ensembles(args.ensemble)
    examples = load_pairs(args.data)
    out = Path(args.out)
    if args.sweep_length:
        prompts |= sweep_lengths(args, out / "sweep")
    if not prompts:
        raise EvalError("nothing to evaluate: give --prompts and/or --sweep-length")
    engine = Engine(args.model_dir, device=args.device, dtype=args.dtype, backend=args.backend)
    report = evaluate_prompts(engine, prompts, examples, mode=args.mode, labels=_csv(args.labels),
                              max_new_tokens=args.max_new_tokens, metrics=tuple(_csv(args.metrics) or ()),
                              ensembles=ensembles)
    out.mkdir(parents=True, exist_ok=True)
    data = report.to_dict() | {"model_dir": str(args.model_dir), "data": str(args.data)}
    (out / "eval.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{report.n} examples (dataset {report.dataset_hash}), mode {report.mode}, ranked by {report.primary_metric}")
    print(format_table(report))
    print(f"wrote {out / 'eval.json'}")
    plot = write_plot(report, out / "eval.png")
    print(f"wrote {plot}" if plot else "matplotlib is not installed: no plot", file=sys.stdout if plot else sys.stderr)
    return 0
