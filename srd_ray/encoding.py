"""How a row becomes a model's tokens, decided once per model (``RowFormat``): prompt/response rows with the
data's prompt template (already applied when the data was loaded), chat rows with the model's chat
template (``srd_ray.chat``).

Stages hand rows to engines as *prompts*: a prompt/response row's prompt is its text; a chat row's is a
``Conversation`` (its messages), which each engine renders with its own tokenizer's template, so the teacher
and the student are each prompted in their own format. ``prompts_of`` makes that list from a table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from srd_ray.chat import ChatTemplate, assistant_difference, encode_chat
from srd_ray.models import EncodedPrompt, TrainingExample, encode_example, encode_prompt

TEXT_COLUMNS = ("example_id", "prompt", "response")
CHAT_COLUMN = "messages"


@dataclass(frozen=True)
class Conversation:
    """A chat row's messages (JSON text, as the data stores them), standing where a prompt string would."""

    messages: str

    def turns(self) -> list[dict]:
        return json.loads(self.messages)


Prompt = str | Conversation


def text_columns(names: Sequence[str]) -> list[str]:
    """The columns a stage needs to encode rows: id, prompt and response, and the messages of chat rows."""
    return [*TEXT_COLUMNS, *([CHAT_COLUMN] if CHAT_COLUMN in names else [])]


def training_text(rows: pa.Table) -> pa.Table:
    """The columns training needs of ``rows`` (``text_columns``)."""
    return rows.select(text_columns(rows.column_names))


def prompts_of(rows: pa.Table) -> list[Prompt]:
    """Each row's prompt: its text, or its Conversation for a chat row."""
    if CHAT_COLUMN not in rows.column_names:
        return rows["prompt"].to_pylist()
    return [Conversation(m) if m is not None else p
            for p, m in zip(rows["prompt"].to_pylist(), rows[CHAT_COLUMN].to_pylist(), strict=True)]  # fmt: skip


def template_of(tokenizer: Any, data: Any) -> ChatTemplate:
    """The chat template a model renders chat rows with (``data.chat_template``: its own, or a file's)."""
    text = None if data.chat_template == "model" else Path(data.chat_template).read_text()
    return ChatTemplate(tokenizer, text, dict(data.chat_template_kwargs))


def template_mismatches(rows: pa.Table, student: RowFormat, teacher: RowFormat) -> dict[int, str]:
    """Chat rows whose scored (assistant) tokens differ between the student's and the teacher's chat
    templates (white-box KD compares the two models token by token on them): row number -> where."""
    problems = {}
    for number, (prompt, response) in enumerate(zip(prompts_of(rows), rows["response"].to_pylist(), strict=True)):
        if isinstance(prompt, Conversation):
            difference = assistant_difference(student.example(prompt, response), teacher.example(prompt, response))
            if difference:
                problems[number] = f"{difference} (data.chat_template: model renders each model with its own)"
    return problems


class RowFormat:
    """Rows -> one model's tokens, with the data settings' lengths (``data``: a ``DataSpec``)."""

    def __init__(self, tokenizer: Any, data: Any) -> None:
        self.tokenizer, self.data = tokenizer, data
        self._template: ChatTemplate | None = None

    @property
    def template(self) -> ChatTemplate:
        if self._template is None:
            self._template = template_of(self.tokenizer, self.data)
        return self._template

    def prompt_ids(self, prompt: Prompt) -> EncodedPrompt:
        """What the model answers: left-truncated to ``max_prompt_tokens``."""
        if isinstance(prompt, Conversation):
            ids = self.tokenizer(self.template.prompt(prompt.turns()), add_special_tokens=False)["input_ids"]
            limit = self.data.max_prompt_tokens
            return EncodedPrompt(ids[-limit:], len(ids) > limit)
        return encode_prompt(self.tokenizer, prompt, self.data.max_prompt_tokens)

    def example(self, prompt: Prompt, response: str) -> TrainingExample:
        """A training row (a chat row's response is its last assistant turn, already in its messages)."""
        data = self.data
        if isinstance(prompt, Conversation):
            return encode_chat(self.template, prompt.turns(), data.max_prompt_tokens, data.max_response_tokens,
                               data.train_on)  # fmt: skip
        return encode_example(self.tokenizer, prompt, response, data.max_prompt_tokens, data.max_response_tokens)
