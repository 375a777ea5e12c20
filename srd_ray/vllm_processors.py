"""vLLM logits processors (imported by vLLM inside the engine, only where vLLM is installed).

vLLM has no ``no_repeat_ngram_size`` sampling option, yet the SRD and MiniLLM protocols generate with
``no_repeat_ngram_size=6``. :class:`NoRepeatNGramProcessor` adds it: a request opts in with
``SamplingParams(extra_args={"no_repeat_ngram_size": n})``.

Each request keeps its own n-gram index (updated with its new tokens only), but the bans of the whole
batch are applied by one indexed write per engine step: the per-request path of vLLM's adapter would make
one small indexed write, with its own host-to-device copy, per request per step (review F18).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor


class NGramBan:
    """Per-request state: every (n-1)-token prefix seen so far in prompt + answer, and the tokens that
    followed it. Updated incrementally, so each step costs O(new tokens), not O(sequence length)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.tokens: list[int] = []
        self.started = False
        self.followers: defaultdict[tuple[int, ...], set[int]] = defaultdict(set)

    def __call__(self, prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        banned = self.banned(prompt_ids, output_ids)
        if banned:
            logits[list(banned)] = float("-inf")
        return logits

    def banned(self, prompt_ids: list[int], output_ids: list[int]) -> set[int]:
        """The tokens that would repeat an n-gram now, after catching up with the new output tokens."""
        if not self.started:
            self.tokens, self.started = list(prompt_ids), True
            self._index_from(0)
        known = len(self.tokens)
        self.tokens.extend(output_ids[known - len(prompt_ids) :])
        self._index_from(known)
        if len(self.tokens) < self.size - 1:
            return set()
        prefix = tuple(self.tokens[len(self.tokens) - self.size + 1 :]) if self.size > 1 else ()
        return self.followers.get(prefix, set())

    def _index_from(self, start: int) -> None:
        """Record the n-grams that end at positions >= start."""
        n = self.size
        for end in range(max(start, n - 1), len(self.tokens)):
            self.followers[tuple(self.tokens[end - n + 1 : end])].add(self.tokens[end])


class NoRepeatNGramProcessor(AdapterLogitsProcessor):
    def is_argmax_invariant(self) -> bool:
        return False  # a ban can remove the most likely token, so it applies to greedy requests too

    def new_req_logits_processor(self, params: SamplingParams) -> NGramBan | None:
        size = (params.extra_args or {}).get("no_repeat_ngram_size")
        return NGramBan(int(size)) if size else None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Every request's bans in one indexed write (the adapter's state holds each request's NGramBan
        with its prompt and live output ids bound)."""
        rows: list[int] = []
        tokens: list[int] = []
        for row, state in self.req_info.items():
            banned = state.func.banned(*state.args)
            rows += [row] * len(banned)
            tokens += banned
        if rows:
            index = torch.tensor([rows, tokens], dtype=torch.long).to(logits.device, non_blocking=True)
            logits[index[0], index[1]] = float("-inf")
        return logits
