"""Loading models and tokenizers, and turning (prompt, response) pairs into token ids.

All loading goes through ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained``: the tiny test
models and real hub models take the same path. Prompt and response are tokenized separately and joined,
in this one place, so reflection, training and evaluation agree on exactly which tokens are "response".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from srd_ray import storage
from srd_ray.errors import ModelError
from srd_ray.spec import ModelSpec
from srd_ray.storage import Location, is_uri

IGNORE_INDEX = -100
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_path(spec: ModelSpec, role: str) -> None:
    """Fail early, before any output is written, on a model folder that cannot hold a model."""
    if not (is_uri(spec.path) or Path(spec.path).is_absolute()):
        return  # a hub id (local paths are made absolute by the spec): from_pretrained reports problems
    try:
        folder = Location.of(spec.path)
        names = {child.name for child in folder.children()} if folder.is_dir() else None
    except OSError as error:  # an object store refusing access, an unknown bucket
        raise ModelError(f"models.{role}.path: cannot read {spec.path}: {error}") from None
    if names is None:
        raise ModelError(f"models.{role}.path: {spec.path} does not exist (expected a save_pretrained folder)")
    if "config.json" not in names:
        raise ModelError(f"models.{role}.path: {spec.path} has no config.json; is it a save_pretrained folder?")
    if not any(name.endswith(".safetensors") for name in names):
        raise ModelError(
            f"models.{role}.path: {spec.path} has no *.safetensors weights (srd-ray loads safetensors only)"
        )


def local_model_path(spec: ModelSpec) -> str:
    """What ``from_pretrained`` and vLLM load: a hub id or local folder as it is; a folder on an object
    store (a model trained into an ``s3://`` run directory) downloaded to this node, once."""
    if not is_uri(spec.path):
        return spec.path
    try:
        return str(storage.local_copy(spec.path))
    except OSError as error:
        raise ModelError(f"cannot download {spec.path}: {error}") from None


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    path = local_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    except Exception as error:  # transformers raises OSError/ValueError/hub errors; all mean "cannot load"
        raise ModelError(f"cannot load tokenizer from {spec.path}: {error}") from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"tokenizer at {spec.path} has no eos token; responses need one to end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ModelSpec, device: torch.device | str = "cpu") -> PreTrainedModel:
    path = local_model_path(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=_DTYPES[spec.dtype],
            trust_remote_code=spec.trust_remote_code,
            use_safetensors=True,
        )
    except Exception as error:  # see load_tokenizer
        raise ModelError(f"cannot load model from {spec.path}: {error}") from None
    return model.to(device)


def model_context_length(spec: ModelSpec) -> int | None:
    """Positions the model was built for (``max_position_embeddings``), or None if its config has none."""
    path = local_model_path(spec)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    except Exception as error:  # see load_tokenizer
        raise ModelError(f"cannot load model config from {spec.path}: {error}") from None
    return getattr(config, "max_position_embeddings", None)


def pick_device(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


@dataclass(frozen=True)
class EncodedPrompt:
    ids: list[int]
    truncated: bool


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, max_tokens: int) -> EncodedPrompt:
    """Prompt token ids, left-truncated: the end of a prompt (the instruction's last words and the
    response header) matters most for what the model says next."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if len(ids) > max_tokens:
        return EncodedPrompt(ids[-max_tokens:], True)
    return EncodedPrompt(ids, False)


def encode_response(tokenizer: PreTrainedTokenizerBase, response: str, max_tokens: int) -> list[int]:
    """Response token ids ending in EOS (the model must learn to stop); right-truncated."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"][: max_tokens - 1]
    return [*ids, tokenizer.eos_token_id]


@dataclass(frozen=True)
class TrainingExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens
    prompt_truncated: bool


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    response: str,
    max_prompt_tokens: int,
    max_response_tokens: int,
) -> TrainingExample:
    encoded = encode_prompt(tokenizer, prompt, max_prompt_tokens)
    response_ids = encode_response(tokenizer, response, max_response_tokens)
    return TrainingExample(
        input_ids=encoded.ids + response_ids,
        labels=[IGNORE_INDEX] * len(encoded.ids) + response_ids,
        prompt_truncated=encoded.truncated,
    )


def collate(examples: list[TrainingExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask and labels (padding labelled IGNORE_INDEX)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def shift_for_next_token(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align position t's logits with token t+1; returns (logits[:, :-1], labels[:, 1:])."""
    return logits[:, :-1, :], labels[:, 1:]


def check_same_tokenizer(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> None:
    """White-box KD compares distributions token by token, so both models must share one vocabulary."""
    if teacher.get_vocab() != student.get_vocab():
        raise ModelError(
            f"teacher and student tokenizers differ (vocab sizes {len(teacher)} vs {len(student)}); "
            "white-box KD needs one shared tokenizer"
        )
