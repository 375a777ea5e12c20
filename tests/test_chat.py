"""Chat rows (``srd_ray.chat``): the tokens training scores, pinned token by token under templates with and
without ``{% generation %}`` marks and one that injects a default system prompt; bad rows; the prompts
reflection and evaluation answer."""

from __future__ import annotations

import pytest

from srd_ray.chat import ChatTemplate, ChatTemplateError, assistant_difference, encode_chat, message_problem
from srd_ray.errors import DataError
from srd_ray.models import IGNORE_INDEX
from srd_ray.tiny_models import train_tokenizer

START, END = "<|im_start|>", "<|im_end|>"
MARKED = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PLAIN = MARKED.replace("{% generation %}", "").replace("{% endgeneration %}", "")
DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    + PLAIN
)
# Drops earlier assistant turns' text when later ones follow (as reasoning templates drop earlier thoughts).
REWRITING = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' and not loop.last %}{{ '<|im_end|>' }}{% else %}{{ m['content'] + '<|im_end|>' }}"
    "{% endif %}{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Spain?"},
    {"role": "assistant", "content": "Madrid."},
    {"role": "user", "content": "Of Italy?"},
    {"role": "assistant", "content": "Rome, since 1871."},
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["Capital of France? Paris. And of Spain? Madrid. Of Italy? Rome, since 1871. You are helpful."] * 20
    tokenizer = train_tokenizer(texts, vocab_size=300)
    tokenizer.add_special_tokens({"additional_special_tokens": [START, END]})
    return tokenizer


def expected_labels(tokenizer, messages, turns):
    """Labels built by hand: the rendering's tokens, scored only on the content + <|im_end|> of ``turns``."""
    text = "".join(f"{START}{m['role']}\n{m['content']}{END}\n" for m in messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for number in turns:
        before = "".join(f"{START}{m['role']}\n{m['content']}{END}\n" for m in messages[:number])
        start = len(tokenizer(before + f"{START}assistant\n", add_special_tokens=False)["input_ids"])
        scored = tokenizer(messages[number]["content"], add_special_tokens=False)["input_ids"]
        scored.append(tokenizer.convert_tokens_to_ids(END))
        assert ids[start : start + len(scored)] == scored, "the hand count assumes tokens do not merge across turns"
        labels[start : start + len(scored)] = scored
    end = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX) + 1
    return ids[:end], labels[:end]


@pytest.mark.parametrize("template", [MARKED, PLAIN], ids=["generation-marks", "turn-by-turn"])
@pytest.mark.parametrize("train_on", ["all_assistant_turns", "last_assistant_turn"])
def test_a_three_turn_chat_scores_exactly_the_assistant_turns(tokenizer, template, train_on):
    example = encode_chat(ChatTemplate(tokenizer, template), CHAT, 512, 512, train_on)
    turns = [2, 4, 6] if train_on == "all_assistant_turns" else [6]
    ids, labels = expected_labels(tokenizer, CHAT, turns)
    assert example.input_ids == ids and example.labels == labels and not example.prompt_truncated


def test_marked_and_turn_by_turn_masks_agree(tokenizer):
    for messages in (CHAT, CHAT[1:], CHAT[1:3]):
        marked, plain = ChatTemplate(tokenizer, MARKED), ChatTemplate(tokenizer, PLAIN)
        assert marked.marks_generation and not plain.marks_generation
        assert marked.assistant_turns(messages) == plain.assistant_turns(messages)


def test_a_template_that_injects_a_system_prompt_never_scores_it(tokenizer):
    template = ChatTemplate(tokenizer, DEFAULT_SYSTEM)
    example = encode_chat(template, CHAT[1:], 512, 512)
    injected = [{"role": "system", "content": "You are helpful."}, *CHAT[1:]]
    assert template.render(CHAT[1:]) == ChatTemplate(tokenizer, PLAIN).render(injected)
    assert (example.input_ids, example.labels) == expected_labels(tokenizer, injected, [2, 4, 6])


def test_the_prompt_ends_exactly_at_the_generation_prompt(tokenizer):
    template = ChatTemplate(tokenizer, MARKED)
    prompt = template.prompt(CHAT)
    assert prompt.endswith(f"{END}\n{START}assistant\n") and "Rome" not in prompt
    example = encode_chat(template, CHAT, 512, 512, "last_assistant_turn")
    context = [token for token, label in zip(example.input_ids, example.labels, strict=True) if label == IGNORE_INDEX]
    assert context == tokenizer(prompt, add_special_tokens=False)["input_ids"], "training's context is that prompt"


def test_lengths_keep_the_end_of_the_context_and_the_start_of_the_last_turn(tokenizer):
    template = ChatTemplate(tokenizer, PLAIN)
    whole = encode_chat(template, CHAT, 512, 512)
    short = encode_chat(template, CHAT, 10, 3)
    context = len(short.input_ids) - 3
    assert short.prompt_truncated and context == 10
    last_start = len(whole.input_ids) - len(tokenizer("Rome, since 1871.", add_special_tokens=False)["input_ids"]) - 1
    assert short.input_ids == whole.input_ids[last_start - 10 : last_start + 3]
    assert short.labels[-3:] == short.input_ids[-3:]


def test_a_template_that_rewrites_earlier_turns_must_mark_them(tokenizer):
    with pytest.raises(ChatTemplateError, match="mark them with"):
        encode_chat(ChatTemplate(tokenizer, REWRITING), CHAT, 512, 512)


def test_a_tokenizer_without_a_template_asks_for_one(tokenizer):
    with pytest.raises(ChatTemplateError, match=r"data\.chat_template"):
        encode_chat(ChatTemplate(tokenizer), CHAT, 512, 512)


def test_mismatched_templates_name_the_first_differing_assistant_token(tokenizer):
    student = encode_chat(ChatTemplate(tokenizer, MARKED), CHAT, 512, 512)
    assert assistant_difference(student, encode_chat(ChatTemplate(tokenizer, PLAIN), CHAT, 512, 512)) is None
    other = MARKED.replace(
        "m['content'] + '<|im_end|>' }}{% endgeneration %}", "m['content'] + '!<|im_end|>' }}{% endgeneration %}"
    )
    teacher = encode_chat(ChatTemplate(tokenizer, other), CHAT, 512, 512)
    problem = assistant_difference(student, teacher)
    position = len(tokenizer("Paris.", add_special_tokens=False)["input_ids"])
    assert problem is not None and problem.startswith(f"assistant token {position} is ")


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "user", "content": "q"}], "last message must be the assistant's"),
        ([{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}], "role 'bot'"),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], "message 1 (assistant) has empty"),
        ([{"role": "assistant", "content": "a"}], "message 0 is 'assistant' where 'user' was due"),
        ([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
         "message 1 is 'user' where 'assistant' was due"),
        ([{"role": "user", "content": "q", "extra": 1}, {"role": "assistant", "content": "a"}], "message 0 must be"),
    ],
)  # fmt: skip
def test_bad_chat_rows_are_named(messages, problem):
    assert problem in message_problem(messages)


def test_good_chat_rows_have_no_problem():
    assert message_problem(CHAT) is None and message_problem(CHAT[1:3]) is None


def test_rows_whose_assistant_tokens_differ_under_the_teachers_template_are_bad_rows(tokenizer, tmp_path):
    """#30: student and teacher each render with their own template; a row whose scored tokens differ is a
    bad row naming the row and the first differing token (on_bad_row: error), or is dropped and listed."""
    import copy
    import json

    from srd_ray.data import drop_bad_rows, load_source
    from srd_ray.encoding import RowFormat, template_mismatches
    from srd_ray.spec import DataSourceSpec, DataSpec

    rows = [{"messages": CHAT[1:3]}, {"messages": CHAT}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = DataSpec(train=DataSourceSpec(path=str(path)), on_bad_row="skip")
    loaded = load_source(data.train, data, label="data.train")
    student, teacher = copy.deepcopy(tokenizer), copy.deepcopy(tokenizer)
    student.chat_template = PLAIN
    teacher.chat_template = MARKED
    assert template_mismatches(loaded.table, RowFormat(student, data), RowFormat(teacher, data)) == {}
    teacher.chat_template = MARKED.replace(
        "{% generation %}{{ m['content'] + '", "{% generation %}{{ m['content'] + '!"
    )
    problems = template_mismatches(loaded.table, RowFormat(student, data), RowFormat(teacher, data))
    assert sorted(problems) == [0, 1] and problems[0].startswith("assistant token ")
    kept = drop_bad_rows(loaded, data, {1: problems[1]}, "no row")
    assert kept.table.num_rows == 1 and "assistant token" in kept.skipped[0]["reason"]
    with pytest.raises(DataError, match=r"example_id .* \(input position 0\): assistant token \d+ is"):
        drop_bad_rows(loaded, data.model_copy(update={"on_bad_row": "error"}), problems, "no row")
