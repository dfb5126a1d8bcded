"""Packs a scheduled batch (token ids, positions, two-segment block tables) and runs the model on it."""

from __future__ import annotations

import torch
from torch import Tensor

from .attention_torch import SeqSlice, TorchPagedAttention
from .attention_triton import TritonPagedAttention
from .decode_graphs import DecodeGraphs
from .greedy_head import ScreenedGreedyHead
from .indices import index_tensor
from .kv_pool import KVPool
from .models import Attention, CausalLM
from .models.base import Layer0Input
from .prompts import SoftPrompt, tokens_as_input_ids
from .recurrent_state import RecurrentBatch
from .sampling import SamplingParams, TokenLogprob, sample_next
from .sequence import Sequence


class NoAttention:
    """The step's "attention" for a model without attention layers (Mamba): nothing to attend with, only the
    sequences' recurrent states to carry (`recurrent`)."""

    recurrent: RecurrentBatch

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        raise RuntimeError(f"layer {layer} attends, but the model was configured without attention layers")


class ModelRunner:
    def __init__(self, model: CausalLM, pool: KVPool, backend: str = "torch", decode_graphs_for: int | None = None):
        """decode_graphs_for: the most sequences a step holds, to run decode steps from CUDA graphs (triton)."""
        self.model = model
        self.pool = pool
        self.backend = backend
        self.device = model.word_embeddings.weight.device
        self.alibi = model.alibi
        head = model.lm_head_module
        # greedy rows without logprobs take the exact int8-screened argmax (None: every row gets fp32 logits)
        self.greedy_head = None
        if ScreenedGreedyHead.applies(head.weight, head.bias):
            if head.weight.stride(0) == 1 and head.weight is not model.word_embeddings.weight:
                # the screen rescores its candidates from whole vocabulary rows: ~15x faster to gather row-major
                # than from [in, out] storage, which makes the fp32 head GEMM of other rows ~20% faster only
                head.weight = torch.nn.Parameter(head.weight.contiguous(), requires_grad=False)
            self.greedy_head = ScreenedGreedyHead(head.weight)
        self.fuse_layer0 = backend == "triton" and model.fused_layer0
        self.decode_graphs = None
        if decode_graphs_for is not None:
            if self.fuse_layer0:
                layer0 = lambda ids, positions: self._fused_layer0(ids, None, positions)  # noqa: E731
            else:
                layer0 = lambda ids, positions: model.embed_tokens(ids)  # noqa: E731
            self.decode_graphs = DecodeGraphs(model, pool, layer0, decode_graphs_for, self.device)
            self.decode_graphs.capture_all()

    def _attention(self, slices: list[SeqSlice], positions: Tensor) -> Attention:
        """The step's attention implementation; where layers keep a recurrent state, it also carries the sequences'
        states (`recurrent`)."""
        c = self.model.config
        attention: Attention
        if self.pool.attention_free:
            attention = NoAttention()
        elif self.backend == "triton":
            rope = getattr(self.model, "rope_tables", None)
            attention = TritonPagedAttention(self.pool, slices, c.attention_scale, self.alibi, positions, rope,
                                             self.device, c.layer_windows, c.attention_softcap,
                                             self.model.attention_sinks)
        else:
            attention = TorchPagedAttention(self.pool, slices, c.attention_scale, self.alibi, c.num_heads,
                                            self.device, c.layer_windows, c.attention_softcap,
                                            self.model.attention_sinks)
        if self.pool.states is not None:
            attention.recurrent = RecurrentBatch.of_slices(slices, self.pool.states)
        return attention

    def _fused_layer0(self, token_ids: Tensor | None, prompt_rows: Tensor | None, positions: Tensor) -> Layer0Input:
        """Layer 0's residual and QKV projection in one kernel whose GEMM prologue gathers the token-embedding or
        soft-prompt rows and norms them (the rows are never concatenated, the normed input never stored)."""
        from softprompt.kernels.input_qkv import fused_input_qkv

        t = positions.shape[0]
        table = self.model.word_embeddings.weight
        is_prompt = torch.full((t,), prompt_rows is not None, dtype=torch.bool, device=self.device)
        index = torch.arange(t, device=self.device)
        norms = self.model.layer0_norms()
        residual, qkv = fused_input_qkv(
            token_ids if token_ids is not None else index,
            index,
            is_prompt,
            table,
            prompt_rows if prompt_rows is not None else table[:0],
            positions if norms.pos_table is not None else None,
            norms.pos_table,
            norms.embed_norm,
            norms.input_norm,
            *norms.qkv,
            residual_is_normed=norms.residual_is_normed,
        )
        return Layer0Input(residual, qkv=qkv)

    @torch.no_grad()
    def compute_prefixes(self, items: list[tuple[SoftPrompt, list[int]]]) -> None:
        """Run the model over prompts' rows (positions 0..P-1 each), in one batch, keeping every layer's K/V
        in the given blocks. A prefix-tuning adapter's K/V are stored as they are."""
        for prompt, blocks in items:
            if prompt.kv is not None:
                self._store_kv(prompt.kv, blocks)
        items = [(prompt, blocks) for prompt, blocks in items if prompt.kv is None]
        if items:
            self._run_prefixes(items)

    def _store_kv(self, kv: Tensor, blocks: list[int]) -> None:
        """Write K/V [layers, 2, P, kv_heads, head_dim] into the first P slots of `blocks`."""
        layers, _, p, heads, head_dim = kv.shape
        size = self.pool.block_size
        padded = kv.new_zeros(layers, 2, len(blocks) * size, heads, head_dim)
        padded[:, :, :p] = kv
        ids = index_tensor(blocks, self.device)
        for layer in range(layers):
            self.pool.kv[layer].index_copy_(1, ids, padded[layer].view(2, len(blocks), size, heads, head_dim))

    def _run_prefixes(self, items: list[tuple[SoftPrompt, list[int]]]) -> None:
        slices = [SeqSlice(prompt.length, [], 0, blocks, 0) for prompt, blocks in items]
        rows = items[0][0].embeds if len(items) == 1 else torch.cat([prompt.embeds for prompt, _ in items])
        positions = torch.cat([torch.arange(prompt.length, device=self.device) for prompt, _ in items])
        attention = self._attention(slices, positions)
        if self.fuse_layer0:
            self.model(None, positions, attention, self._fused_layer0(None, rows, positions))
        else:
            self.model(rows, positions, attention)

    @torch.no_grad()
    def run(
        self, seqs: list[Sequence], num_tokens: list[int], logits_for: list[int] | None = None, all_logits: bool = False
    ) -> Tensor:
        """Compute `num_tokens[i]` new own tokens of each sequence; return fp32 logits of the last new token of
        the sequences `logits_for` (default: all) [len, V], or of every new token [T, V] with `all_logits`."""
        return self.model.compute_logits(self.hidden(seqs, num_tokens, logits_for, all_logits))

    @torch.no_grad()
    def sample(self, hidden: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
               histories: list[tuple[list[int], list[int]]] | None = None, eos_token_ids: tuple[int, ...] = (),
               screenable: list[bool] | None = None, processes: list[bool] | None = None,
               guides: list | None = None, gates: list | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
        """The next token of each row of final hidden states (see sample_next: `histories` are the rows' (input
        ids, generated tokens), for logit processors); greedy rows that want no logprobs and process no logits
        skip the fp32 logits (ScreenedGreedyHead gives their exact argmax). `screenable` and `processes`: the
        rows' `params.screenable` and `params.processes_logits`, if the caller has them already; `guides`: the
        rows' GrammarGuides (structured outputs), where any row has one; `gates`: their ThoughtGates (see
        process_logits), where any row has one."""
        fast = []
        if self.greedy_head is not None:
            if screenable is None:
                screenable = [p.screenable for p in params]
            fast = [i for i, ok in enumerate(screenable) if ok]
        if not fast:
            return sample_next(self.model.compute_logits(hidden), params, generators, histories, eos_token_ids,
                               processes, guides, gates)
        tokens: list[int] = [0] * len(params)
        logprobs: list[TokenLogprob | None] = [None] * len(params)
        picked = self.greedy_head(hidden.index_select(0, index_tensor(fast, self.device)))
        for i, token in zip(fast, picked.tolist()):
            tokens[i] = token
        rest = sorted(set(range(len(params))) - set(fast))
        if rest:
            logits = self.model.compute_logits(hidden.index_select(0, index_tensor(rest, self.device)))
            rest_tokens, rest_logprobs = sample_next(logits, [params[i] for i in rest], [generators[i] for i in rest],
                                                     None if histories is None else [histories[i] for i in rest],
                                                     eos_token_ids,
                                                     None if processes is None else [processes[i] for i in rest],
                                                     None if guides is None else [guides[i] for i in rest],
                                                     None if gates is None else [gates[i] for i in rest])
            for i, token, lp in zip(rest, rest_tokens, rest_logprobs):
                tokens[i], logprobs[i] = token, lp
        return tokens, logprobs

    @torch.no_grad()
    def hidden(
        self, seqs: list[Sequence], num_tokens: list[int], rows_for: list[int] | None = None, all_rows: bool = False
    ) -> Tensor:
        """Final hidden states (after the last norm) of the last new token of the sequences `rows_for` (default:
        all), or of every new token with `all_rows`."""
        graphs = self.decode_graphs
        if graphs is not None and graphs.continues(seqs, num_tokens):
            return self._graph_rows(graphs.run_next(seqs), rows_for, all_rows)
        ids, positions, slices = self.pack(seqs, num_tokens)
        if graphs is not None and graphs.applies(slices):
            return self._graph_rows(graphs.run(ids, positions, slices, seqs), rows_for, all_rows)
        ids_t = index_tensor(ids, self.device)
        pos_t = index_tensor(positions, self.device)
        attention = self._attention(slices, pos_t)
        if self.fuse_layer0:
            hidden = self.model(None, pos_t, attention, self._fused_layer0(ids_t, None, pos_t))
        else:
            hidden = self.model(self._token_embeddings(ids_t, seqs, num_tokens), pos_t, attention)
        if not all_rows:
            last = index_tensor(num_tokens, self.device).cumsum(0) - 1
            if rows_for is not None:
                last = last[index_tensor(rows_for, self.device)]
            hidden = hidden.index_select(0, last)
        return hidden

    def _token_embeddings(self, ids: Tensor, seqs: list[Sequence], num_tokens: list[int]) -> Tensor:
        """The packed tokens' embeddings; where the model scales the embeddings of its input ids (Falcon-H1), those
        of the sequences whose tokens are input ids (no prompt, a text prompt), not those after PEFT's rows."""
        embeds = self.model.embed_tokens(ids)
        scale = self.model.config.token_embedding_multiplier
        if scale == 1.0:
            return embeds
        scaled = torch.repeat_interleave(torch.tensor([tokens_as_input_ids(seq.prompt) for seq in seqs]),
                                         torch.tensor(num_tokens)).to(embeds.device)
        return torch.where(scaled[:, None], embeds * scale, embeds)  # (times the float, as transformers rounds it)

    @staticmethod
    def pack(seqs: list[Sequence], num_tokens: list[int]) -> tuple[list[int], list[int], list[SeqSlice]]:
        """The new tokens' ids and positions, packed, and each sequence's slice of the batch."""
        ids, positions, slices = [], [], []
        for seq, n in zip(seqs, num_tokens):
            start = seq.num_computed
            ids.extend(seq.token_slice(start, n))
            p = seq.prefix_length
            positions.extend(range(p + start, p + start + n))
            prefix_blocks = seq.prefix.blocks if seq.prefix is not None else []
            slices.append(SeqSlice(n, prefix_blocks, p, seq.blocks, start))
        return ids, positions, slices

    def _graph_rows(self, hidden: Tensor, rows_for: list[int] | None, all_rows: bool) -> Tensor:
        """The rows wanted of a graph step's output (one row per sequence, in a buffer the next step reuses)."""
        if all_rows or rows_for is None:
            return hidden.clone()
        return hidden.index_select(0, index_tensor(rows_for, self.device))  # a copy too
