"""The tiny-model kit: a locally trained tokenizer and a small teacher/student pair sharing it.

This machine reaches no model hub, so tests and the quickstart build their models here and save them
with ``save_pretrained``; everything downstream loads them through ``from_pretrained`` exactly like a hub
model. An optional short causal-LM pretraining stands in for the pretraining real students have had.
"""

from __future__ import annotations

import logging
import os
import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from srd_ray import storage
from srd_ray.models import IGNORE_INDEX
from srd_ray.spec import TinyModelSpec, TinyModelsSpec
from srd_ray.storage import Location

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML, with the assistant's text marked for transformers' assistant masks (srd_ray.chat).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: list[str], vocab_size: int, chat: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes) that splits digits one by one, so arithmetic is learnable. With
    ``chat``: ChatML's tokens and template, and <|im_end|> as the end of a turn (EOS)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD, *([IM_START, IM_END] if chat else [])],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # Built through the `tokenizers` object: transformers 5 ignores some legacy constructor keywords.
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=IM_END if chat else EOS, pad_token=PAD)
    if chat:
        wrapped.chat_template = CHATML_TEMPLATE
    return wrapped


def build_model(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast, seed: int) -> PreTrainedModel:
    torch.manual_seed(seed)
    common = {
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if spec.architecture == "llama":
        config = LlamaConfig(
            hidden_size=spec.hidden_size,
            intermediate_size=spec.hidden_size * 2,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_heads,
            max_position_embeddings=spec.max_positions,
            bos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
            **common,
        )
    else:
        config = GPT2Config(
            n_embd=spec.hidden_size,
            n_layer=spec.num_layers,
            n_head=spec.num_heads,
            n_positions=spec.max_positions,
            bos_token_id=tokenizer.eos_token_id,
            **common,
        )
    return AutoModelForCausalLM.from_config(config)


def pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> float:
    """Plain causal-LM training on whole texts; returns the last step's loss."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1), eta_min=lr / 10)
    encoded = [tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"] for text in texts]
    model.train()
    loss_value = float("nan")
    for _ in range(steps):
        batch = rng.sample(encoded, min(batch_size, len(encoded)))
        width = max(map(len, batch))
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids in batch])
        labels = torch.tensor([ids + [IGNORE_INDEX] * (width - len(ids)) for ids in batch])
        loss = model(input_ids=input_ids, attention_mask=(labels != IGNORE_INDEX).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
    model.eval()
    return loss_value


def make_tiny_models(
    out_dir: str | os.PathLike,
    spec: TinyModelsSpec,
    tokenizer_texts: list[str],
    pretrain_texts: list[str] | None = None,
    seed: int = 0,
) -> dict[str, str]:
    """Build ``out_dir/teacher`` and ``out_dir/student`` (each a full save_pretrained folder with the
    shared tokenizer), each written atomically. Returns the two paths."""
    tokenizer = train_tokenizer(tokenizer_texts, spec.vocab_size, chat=spec.chat)
    paths = {}
    for offset, (role, model_spec) in enumerate((("teacher", spec.teacher), ("student", spec.student))):
        model = build_model(model_spec, tokenizer, seed + offset)
        if model_spec.pretrain_steps and pretrain_texts:
            loss = pretrain(
                model,
                tokenizer,
                pretrain_texts,
                steps=model_spec.pretrain_steps,
                lr=spec.pretrain_lr,
                batch_size=spec.pretrain_batch_size,
                seed=seed + offset,
            )
            log.info("pretrained tiny %s for %d steps, final loss %.3f", role, model_spec.pretrain_steps, loss)
        target = Location.of(out_dir) / role
        with storage.directory(target) as scratch:
            model.save_pretrained(scratch, safe_serialization=True)
            tokenizer.save_pretrained(scratch)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("tiny %s: %s, %.2fM parameters -> %s", role, model_spec.architecture, n_params / 1e6, target)
        paths[role] = str(target)
    return paths
