"""Guided choice (vLLM's `guided_choice`): the generated tokens spell one of a few given choices, as the tokenizer
encodes each on its own; the request ends once a choice is complete and no longer one goes on from it (or, where
one does, when EOS is picked there)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

Choices = tuple[tuple[int, ...], ...]
_END = -1  # a trie key: a choice ends here

MAX_GUIDED_CHOICES = 256


@lru_cache(maxsize=1024)
def _trie(choices: Choices) -> dict:
    root: dict = {}
    for ids in choices:
        node = root
        for token in ids:
            node = node.setdefault(token, {})
        node[_END] = {}
    return root


def _node(choices: Choices, generated: Sequence[int]) -> dict | None:
    node = _trie(choices)
    for token in generated:
        node = node.get(token)
        if node is None:
            return None
    return node


def allowed_next(choices: Choices, generated: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """The tokens that keep `generated` on the way to a choice; EOS where a choice is complete (and may stop)."""
    node = _node(choices, generated)
    if node is None:  # not on any choice's path (the request should have ended): only EOS
        return list(eos_ids)
    nexts = [t for t in node if t != _END]
    return nexts + list(eos_ids) if _END in node else nexts


def choice_complete(choices: Choices, generated: Sequence[int]) -> bool:
    """Whether `generated` is a whole choice that no longer choice goes on from (then nothing is left to pick)."""
    node = _node(choices, generated)
    return node is not None and _END in node and len(node) == 1
