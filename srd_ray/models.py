"""Loading models and tokenizers, and turning (prompt, response) pairs into token ids.

All loading goes through ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained``: the tiny test
models and real hub models take the same path. Prompt and response are tokenized separately and joined,
in this one place, so reflection, training and evaluation agree on exactly which tokens are "response".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from srd_ray import auto, storage
from srd_ray.errors import ModelError
from srd_ray.failures import InfrastructureError, chain
from srd_ray.spec import LoraSpec, ModelSpec
from srd_ray.storage import Location, is_uri
from srd_ray.tokens import IGNORE_INDEX, Head

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_path(spec: ModelSpec, role: str) -> None:
    """Fail early, before any output is written, on a model folder that cannot hold a model, an adapter
    folder that holds no adapter, or LoRA targets the model does not have."""
    _check_folder(spec.path, f"models.{role}.path", "config.json", "a save_pretrained folder")
    adapter = getattr(spec, "adapter", None)
    if adapter is not None:
        _check_folder(adapter, f"models.{role}.adapter", "adapter_config.json", "a peft adapter folder")
    lora = getattr(spec, "lora", None)
    if lora is not None:
        problem = lora_target_problem(spec, lora)
        if problem:
            raise ModelError(f"models.{role}.lora.target_modules: {problem}")


def _check_folder(path: str, field: str, config_name: str, what: str) -> None:
    if not (is_uri(path) or Path(path).is_absolute()):
        return  # a hub id (local paths are made absolute by the spec): from_pretrained reports problems
    try:
        folder = Location.of(path)
        names = {child.name for child in folder.children()} if folder.is_dir() else None
    except OSError as error:  # an object store refusing access, an unknown bucket
        raise ModelError(f"{field}: cannot read {path}: {error}") from None
    if names is None:
        raise ModelError(f"{field}: {path} does not exist (expected {what})")
    if config_name not in names:
        raise ModelError(f"{field}: {path} has no {config_name}; is it {what}?")
    if not any(name.endswith(".safetensors") for name in names):
        raise ModelError(f"{field}: {path} has no *.safetensors weights (srd-ray loads safetensors only)")


def local_model_path(spec: ModelSpec) -> str:
    """What ``from_pretrained`` and vLLM load: a hub id or local folder as it is; a folder on an object
    store (a model trained into an ``s3://`` run directory) downloaded to this node, once; a model with an
    ``adapter`` merged with it into a plain folder, once per node, so every loader sees one model."""
    path = _fetched(spec.path)
    adapter = getattr(spec, "adapter", None)
    return path if adapter is None else _merged_with_adapter(spec, path, _fetched(adapter))


def _fetched(path: str) -> str:
    if not is_uri(path):
        return path
    try:
        return str(storage.local_copy(path))
    except OSError as error:
        raise loading_error(f"(download) {path}", error) from error


def _merged_with_adapter(spec: ModelSpec, base: str, adapter: str) -> str:
    from peft import PeftModel

    def merge(scratch: Path) -> None:
        model = _from_pretrained(spec, base, dtype="auto")
        try:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        except Exception as error:  # peft raises ValueError/OSError/KeyError for folders that are no adapter
            raise ModelError(f"models.teacher.adapter: cannot apply {spec.adapter} to {spec.path}: {error}") from None
        model.save_pretrained(scratch, safe_serialization=True)
        AutoTokenizer.from_pretrained(base, trust_remote_code=spec.trust_remote_code).save_pretrained(scratch)

    identity = [base, adapter, *(storage.file_identity(adapter) if Path(adapter).is_dir() else [])]
    return str(storage.cached_folder("merged", Path(adapter).name, identity, merge))


def loading_error(what: str, error: Exception) -> Exception:
    """A model that cannot be loaded: the user's input (ModelError, exit 2), unless storage, the network or
    permissions failed, which says nothing about the spec (InfrastructureError, keeping its cause)."""
    infrastructure = (ConnectionError, TimeoutError, PermissionError)
    names = ("Connect", "Timeout", "HTTPError", "ServerError", "ProtocolError")
    words = ("could not connect", "connection refused", "timed out", "access denied", "permission denied")
    for current in chain(error):
        if (
            isinstance(current, infrastructure)
            or any(name in type(current).__name__ for name in names)
            or any(word in str(current).lower() for word in words)
        ):
            return InfrastructureError(
                f"cannot read {what}: {type(current).__name__}: {current} (storage, network or permissions "
                "failed, not the spec: rerun once it is reachable)"
            )
    return ModelError(f"cannot load {what}: {error}")


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    path = _fetched(spec.path)  # an adapter changes weights only: no merge needed to read the tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
    except Exception as error:  # transformers raises OSError/ValueError/hub errors; all mean "cannot load"
        raise loading_error(f"tokenizer from {spec.path}", error) from error
    if tokenizer.eos_token_id is None:
        raise ModelError(f"tokenizer at {spec.path} has no eos token; responses need one to end")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_pretrained(spec: ModelSpec, path: str, dtype: Any) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=spec.trust_remote_code, use_safetensors=True
        )
    except Exception as error:  # see load_tokenizer
        raise loading_error(f"model from {spec.path}", error) from error


def weights_dtype(spec: ModelSpec, device: torch.device | str = "cpu") -> str:
    """The dtype a model's weights load in: the spec's, ``auto`` (a frozen teacher) resolved for the device
    that computes with them (``srd_ray.auto``)."""
    return auto.frozen_weights_dtype(spec.dtype, *auto.device_facts(torch.device(device).type))


def load_model(spec: ModelSpec, device: torch.device | str = "cpu") -> PreTrainedModel:
    return _from_pretrained(spec, local_model_path(spec), DTYPES[weights_dtype(spec, device)]).to(device)


def build_on_meta(spec: ModelSpec) -> PreTrainedModel:
    """The model's structure with no weights (meta tensors): shard it first, then load the weights."""
    config = load_config(spec)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(
            config, dtype=DTYPES[weights_dtype(spec)], trust_remote_code=spec.trust_remote_code
        )


def load_config(spec: ModelSpec) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(_fetched(spec.path), trust_remote_code=spec.trust_remote_code)
    except Exception as error:  # see load_tokenizer
        raise loading_error(f"model config from {spec.path}", error) from error


# --------------------------------------------------------------------------------------------------------
# Training views of a model: LoRA adapters, the output head, final hidden states


def add_lora(model: PreTrainedModel, lora: LoraSpec) -> torch.nn.Module:
    """Wrap ``model`` with new, trainable LoRA adapters (every other weight frozen)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    return get_peft_model(model, config)


def load_adapter(model: PreTrainedModel, folder: str) -> torch.nn.Module:
    """``model`` with the trainable LoRA adapters saved in ``folder`` (a checkpoint)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, folder, is_trainable=True)


def causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (LoRA layers are injected into it in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(model: torch.nn.Module, vocab_size: int) -> Head:
    """The LM head's weights and the output transforms the loss must apply after it."""
    lm = causal_lm(model)
    linear = lm.get_output_embeddings()
    config = lm.config.get_text_config()
    scale = getattr(config, "logit_scale", None) or 1.0
    return Head(linear.weight, linear.bias, vocab_size, scale, getattr(config, "final_logit_softcapping", None))


def final_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq, hidden] after the final norm: what the LM head reads. The head itself is not run."""
    decoder = causal_lm(model).base_model
    return decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def lora_target_problem(spec: ModelSpec, lora: LoraSpec) -> str | None:
    """Why ``lora.target_modules`` does not fit this model (None if it does), from its structure alone."""
    model = build_on_meta(spec)
    head = model.get_output_embeddings()
    head_name = next(name for name, module in model.named_modules() if module is head).rsplit(".", 1)[-1]
    if lora.target_modules == "all-linear":
        return None
    if head_name in lora.target_modules:
        return f"{head_name!r} is the output head, which LoRA may not adapt here (the loss reads its weights)"
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    unknown = [name for name in lora.target_modules if name not in names]
    if not unknown:
        return None
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if "Linear" in type(m).__name__
                     or type(m).__name__ == "Conv1D"} - {head_name})  # fmt: skip
    return f"no module named {', '.join(map(repr, unknown))} in {spec.path} (its linear layers: {', '.join(linear)})"


def model_context_length(spec: ModelSpec) -> int | None:
    """Positions the model was built for (``max_position_embeddings``), or None if its config has none."""
    return getattr(load_config(spec), "max_position_embeddings", None)


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

    @property
    def scored_tokens(self) -> int:
        """Response tokens the loss scores (each predicted from the tokens before it)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


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
