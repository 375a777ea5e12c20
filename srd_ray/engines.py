"""Generation engines: answer prompts and measure teacher-forced cross-entropy.

An engine is loaded once per Ray actor and serves both reflection and evaluation. The transformers
engine runs everywhere (CPU here, GPU in production); every engine has the same two methods so stage code
never depends on which one runs.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import torch
import torch.nn.functional as F

from srd_ray.models import (
    IGNORE_INDEX,
    collate,
    encode_example,
    encode_prompt,
    load_model,
    load_tokenizer,
    pick_device,
    shift_for_next_token,
)
from srd_ray.spec import GenerationSpec, ModelSpec


class Engine(Protocol):
    def generate(self, prompts: list[str], settings: GenerationSpec, seed: int) -> tuple[list[str], list[bool]]:
        """Answers and, per prompt, whether it was left-truncated."""

    def response_cross_entropy(self, prompts: list[str], responses: list[str]) -> tuple[list[float], list[int]]:
        """Mean token cross-entropy of each response given its prompt, and its token count."""


def batch_seed(base_seed: int, first_example_id: str) -> int:
    """A sampling seed that depends on the data, not on which actor or in which order a batch runs."""
    digest = hashlib.sha256(f"{base_seed}:{first_example_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class TransformersEngine:
    """Batched, left-padded ``generate`` and a teacher-forced forward pass, under ``torch.inference_mode``."""

    def __init__(
        self, model: ModelSpec, *, max_prompt_tokens: int, max_response_tokens: int, num_gpus: float = 0.0
    ) -> None:
        self.device = pick_device(num_gpus)
        self.tokenizer = load_tokenizer(model)
        self.model = load_model(model, self.device).eval()
        self.max_prompt_tokens = max_prompt_tokens
        self.max_response_tokens = max_response_tokens

    @torch.inference_mode()
    def generate(self, prompts: list[str], settings: GenerationSpec, seed: int) -> tuple[list[str], list[bool]]:
        encoded = [encode_prompt(self.tokenizer, p, self.max_prompt_tokens) for p in prompts]
        width = max(len(e.ids) for e in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(e.ids)) + e.ids for e in encoded], device=self.device)
        attention_mask = torch.tensor(
            [[0] * (width - len(e.ids)) + [1] * len(e.ids) for e in encoded], device=self.device
        )
        torch.manual_seed(seed)
        sampling = settings.temperature > 0
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=sampling,
            temperature=settings.temperature if sampling else None,
            top_k=settings.top_k if sampling else None,
            top_p=settings.top_p if sampling else None,
            no_repeat_ngram_size=settings.no_repeat_ngram_size,
            max_new_tokens=settings.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        answers = self.tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
        return [a.strip() for a in answers], [e.truncated for e in encoded]

    @torch.inference_mode()
    def response_cross_entropy(self, prompts: list[str], responses: list[str]) -> tuple[list[float], list[int]]:
        examples = [
            encode_example(self.tokenizer, p, r, self.max_prompt_tokens, self.max_response_tokens)
            for p, r in zip(prompts, responses, strict=True)
        ]
        batch = {k: v.to(self.device) for k, v in collate(examples, self.tokenizer.pad_token_id).items()}
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = shift_for_next_token(logits.float(), batch["labels"])
        token_ce = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).view(labels.shape)
        counts = (labels != IGNORE_INDEX).sum(dim=1)
        mean_ce = token_ce.sum(dim=1) / counts.clamp(min=1)
        return mean_ce.tolist(), counts.tolist()


def build_engine(
    name: str, model: ModelSpec, *, max_prompt_tokens: int, max_response_tokens: int, num_gpus: float
) -> Engine:
    if name == "transformers":
        return TransformersEngine(
            model,
            max_prompt_tokens=max_prompt_tokens,
            max_response_tokens=max_response_tokens,
            num_gpus=num_gpus,
        )
    raise ValueError(f"unknown engine {name!r}")
