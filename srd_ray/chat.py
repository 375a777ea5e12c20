"""Chat rows: OpenAI-style ``messages`` rendered with a model's own chat template, and the tokens training
scores in them.

A chat row is a list of ``{"role", "content"}`` messages: an optional system message first, then user and
assistant turns alternating, ending with the assistant's. Rendering uses the tokenizer's template (or one
the user gives) with the same keyword arguments everywhere (e.g. ``enable_thinking: false``), so training,
reflection, the teacher pass and evaluation see the format the model will be prompted with.

Which tokens are scored. Only assistant turns (all of them, or the last), never system, user or template
tokens. A template that marks assistant text with ``{% generation %}`` says so itself (transformers returns
the mask). For one that does not, the turns are found by rendering incrementally: assistant turn i is the
text that rendering ``messages[: i + 1]`` adds after rendering ``messages[:i]`` with the generation prompt,
less trailing whitespace. A template whose earlier text changes when a turn is added (some drop earlier
turns' reasoning) cannot be read that way, and says so: mark its assistant turns instead. Where a template
has both, the two agree (tests pin it). A turn's tokens run from the token holding its first character to
the one holding its last, as transformers counts them.

The last assistant turn is the row's response (what reflection and evaluation compare answers with); what
comes before it, rendered with the generation prompt, is its prompt. Lengths follow the prompt/response
rows: the context keeps its last ``max_prompt_tokens`` tokens, the last turn its first
``max_response_tokens``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from srd_ray.models import IGNORE_INDEX, TrainingExample

ROLES = ("system", "user", "assistant")
TRAIN_ON = ("all_assistant_turns", "last_assistant_turn")
_GENERATION_MARK = re.compile(r"{%-?\s*generation\s*-?%}")


class ChatTemplateError(ValueError):
    """A template that cannot say which tokens are the assistant's."""


def message_problem(messages: Any) -> str | None:
    """Why ``messages`` is not a chat row training can use (None if it is)."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        return "messages must be a non-empty list of {role, content}"
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content", "name"}:
            return f"message {number} must be a {{role, content}} object"
        if message.get("role") not in ROLES:
            return f"message {number} has role {message.get('role')!r}, not one of {', '.join(ROLES)}"
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            return f"message {number} ({message['role']}) has empty content"
    first = 1 if messages[0]["role"] == "system" else 0
    for number in range(first, len(messages)):
        expected = ("user", "assistant")[(number - first) % 2]
        if messages[number]["role"] != expected:
            return f"message {number} is {messages[number]['role']!r} where {expected!r} was due (turns alternate)"
    if messages[-1]["role"] != "assistant":
        return "the last message must be the assistant's (the response to learn)"
    return None


@dataclass(frozen=True)
class ChatTemplate:
    """A tokenizer's chat template (or ``template``, Jinja text that overrides it) and the keyword arguments
    every render passes (``chat_template_kwargs``)."""

    tokenizer: Any
    template: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    @cached_property  # rendering runs per row: the template text and its kind are read once
    def text(self) -> str:
        text = self.template or getattr(self.tokenizer, "chat_template", None)
        if not text:
            raise ChatTemplateError("the tokenizer has no chat template: give data.chat_template a Jinja file")
        return text if isinstance(text, str) else text["default"]

    @cached_property
    def marks_generation(self) -> bool:
        return bool(_GENERATION_MARK.search(self.text))

    def render(self, messages: Sequence[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(list(messages), chat_template=self.text, tokenize=False,
                                                  add_generation_prompt=generation_prompt, **self.kwargs)  # fmt: skip

    def prompt(self, messages: Sequence[dict]) -> str:
        """What comes before the last assistant turn, with the generation prompt: what the model answers."""
        return self.render(messages[:-1], generation_prompt=True)

    def assistant_turns(self, messages: Sequence[dict]) -> tuple[list[int], list[tuple[int, int]]]:
        """The whole conversation's token ids and each assistant turn's tokens as [first, last + 1) ranges."""
        if self.marks_generation:
            encoded = self.tokenizer.apply_chat_template(list(messages), chat_template=self.text, tokenize=True,
                                                         return_dict=True, return_assistant_tokens_mask=True,
                                                         **self.kwargs)  # fmt: skip
            return list(encoded["input_ids"]), _runs(encoded["assistant_masks"])
        text = self.render(messages)
        encoded = self.tokenizer(text, add_special_tokens=False)
        turns = []
        for start, end in self._spans(messages, text):
            first, last = encoded.char_to_token(start), encoded.char_to_token(end - 1)
            turns.append((first, last + 1))
        return list(encoded["input_ids"]), turns

    def _spans(self, messages: Sequence[dict], text: str) -> list[tuple[int, int]]:
        """Character ranges of the assistant turns in ``text``, by incremental rendering."""
        spans = []
        for number, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = (
                self.render(messages[:number], generation_prompt=True),
                self.render(messages[: number + 1]),
            )
            if not through.startswith(before) or not text.startswith(through):
                raise ChatTemplateError(
                    f"the chat template rewrites earlier text when turn {number} is added, so its assistant turns "
                    "cannot be found by rendering turn by turn: mark them with {% generation %} in the template"
                )
            end = len(through.rstrip())
            if end > len(before):
                spans.append((len(before), end))
        return spans


def _runs(mask: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) ranges of the 1s in a 0/1 mask."""
    runs, start = [], None
    for position, value in enumerate([*mask, 0]):
        if value and start is None:
            start = position
        elif not value and start is not None:
            runs.append((start, position))
            start = None
    return runs


def encode_chat(template: ChatTemplate, messages: Sequence[dict], max_prompt_tokens: int, max_response_tokens: int,
                train_on: str = "all_assistant_turns") -> TrainingExample:  # fmt: skip
    """A chat row as training sees it: the context (left-truncated) then the last assistant turn
    (right-truncated); labels on the assistant turns ``train_on`` names, IGNORE_INDEX elsewhere."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {', '.join(TRAIN_ON)}, not {train_on!r}")
    ids, turns = template.assistant_turns(messages)
    if not turns:
        raise ChatTemplateError("the chat template rendered no assistant tokens")
    last_start, last_end = turns[-1]
    cut = max(0, last_start - max_prompt_tokens)
    context, response = ids[cut:last_start], ids[last_start : min(last_end, last_start + max_response_tokens)]
    labels = [IGNORE_INDEX] * len(context) + response
    if train_on == "all_assistant_turns":
        for start, end in turns[:-1]:
            for position in range(max(start, cut), end):
                labels[position - cut] = ids[position]
    return TrainingExample(input_ids=context + response, labels=labels, prompt_truncated=cut > 0)


def assistant_difference(student: TrainingExample, teacher: TrainingExample) -> str | None:
    """Where the scored tokens of one row differ between the student's and the teacher's renderings (white-box
    KD compares the two models token by token on them); None if they are the same."""
    ours = [token for token in student.labels if token != IGNORE_INDEX]
    theirs = [token for token in teacher.labels if token != IGNORE_INDEX]
    for position, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b:
            return f"assistant token {position} is {a} under the student's template and {b} under the teacher's"
    if len(ours) != len(theirs):
        return f"the student's template gives {len(ours)} assistant tokens, the teacher's {len(theirs)}"
    return None
