"""A seeded generator of instruction data with a known, graded difficulty.

The quickstart needs data that ships with the project and lets a user see SRD's ranking recover
difficulty. The generator invents a small world (made-up countries with a capital, a currency, a colour
and an animal) and asks questions about it. Each fact has a true ``difficulty`` 1..5: how *rarely* it
appears in the pretraining split (difficulty 1 facts are seen often, difficulty 5 facts never), which is
exactly what makes a pair hard for a pretrained but untuned student. The training split asks about every
fact equally often, so a teacher fine-tuned on it knows them all. ``difficulty`` is a column for
evaluation only; reflect and rank never read it.

Rows are written in the MiniLLM JSONL format (``prompt``, ``instruction``, ``input``, ``output``).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

from srd_ray import storage
from srd_ray.spec import MINILLM_TEMPLATE_NO_INPUT, MINILLM_TEMPLATE_WITH_INPUT
from srd_ray.storage import Location

MAX_DIFFICULTY = 5
# Times a fact of difficulty d is drawn per pretraining pass, relative to difficulty 1.
PRETRAIN_WEIGHTS = {1: 16, 2: 8, 3: 4, 4: 1, 5: 0}

_COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "golden"]
_ANIMALS = ["fox", "owl", "bear", "eagle", "wolf", "heron", "lynx", "otter", "bison", "falcon", "crane"]
_QUESTIONS = {
    "capital": [
        ("What is the capital of {country}?", ""),
        ("Name the capital city of the given country.", "{country}"),
        ("Which city is the capital of {country}?", ""),
    ],
    "currency": [
        ("What currency is used in {country}?", ""),
        ("Name the currency of the given country.", "{country}"),
        ("Which money do people pay with in {country}?", ""),
    ],
    "colour": [
        ("What colour is the flag of {country}?", ""),
        ("Give the flag colour of the given country.", "{country}"),
        ("Which colour does the flag of {country} have?", ""),
    ],
    "animal": [
        ("What is the national animal of {country}?", ""),
        ("Name the national animal of the given country.", "{country}"),
        ("Which animal is the symbol of {country}?", ""),
    ],
}
PHRASINGS = 3
_ANSWERS = {
    "capital": "The capital of {country} is {value}.",
    "currency": "{country} uses the {value}.",
    "colour": "The flag of {country} is {value}.",
    "animal": "The national animal of {country} is the {value}.",
}


@dataclass(frozen=True)
class Fact:
    country: str
    relation: str
    value: str
    difficulty: int


def _made_up_word(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(syllables))
    return word.capitalize()


def make_world(seed: int, countries: int) -> list[Fact]:
    """The facts of one invented world; each fact gets a difficulty 1..5 uniformly at random."""
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < countries:
        names.add(_made_up_word(rng, 3))
    facts = []
    for country in sorted(names):
        values = {
            "capital": _made_up_word(rng, 2),
            "currency": _made_up_word(rng, 2).lower(),
            "colour": rng.choice(_COLOURS),
            "animal": rng.choice(_ANIMALS),
        }
        facts += [Fact(country, relation, value, rng.randint(1, MAX_DIFFICULTY)) for relation, value in values.items()]
    return facts


def _row(fact: Fact, phrasing: int) -> dict:
    instruction, given = _QUESTIONS[fact.relation][phrasing]
    instruction, given = instruction.format(country=fact.country), given.format(country=fact.country)
    template = MINILLM_TEMPLATE_WITH_INPUT if given else MINILLM_TEMPLATE_NO_INPUT
    return {
        "instruction": instruction,
        "input": given,
        "output": _ANSWERS[fact.relation].format(country=fact.country, value=fact.value),
        "prompt": template.format(instruction=instruction, input=given),
        "task": fact.relation,
        "difficulty": fact.difficulty,
    }


def generate_rows(facts: list[Fact], count: int, seed: int, weights: dict[int, int]) -> list[dict]:
    """``count`` question rows, each fact drawn with weight ``weights[difficulty]`` (repeats allowed)."""
    rng = random.Random(seed)
    fact_weights = [weights[f.difficulty] for f in facts]
    return [_row(fact, rng.randrange(PHRASINGS)) for fact in rng.choices(facts, weights=fact_weights, k=count)]


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> None:
    storage.write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


LM_EVAL_TASK = "srd_demo_facts"
CHOICES = 4


def write_lm_eval_task(folder: Location, heldout: list[tuple[Fact, dict]], facts: list[Fact], chat: bool,
                       seed: int) -> str:  # fmt: skip
    """A multiple-choice lm-eval task (``srd_demo_facts``) on the held-out questions: the answer sentence
    with the true value against 3 (fewer in a world of fewer countries) with another country's value of the
    same relation; lm-eval's ``acc`` is the share where the model finds the true one likeliest. The context
    is what the models are trained on: the templated prompt, or for chat data the question as the user's
    turn (rendered with the model's chat template under ``evaluate.lm_eval.apply_chat_template``); the
    answer follows it directly."""
    rng = random.Random(seed + 2)
    values: dict[str, list[str]] = {}
    for fact in facts:
        values.setdefault(fact.relation, []).append(fact.value)
    docs = []
    for fact, row in heldout:
        others = sorted(set(values[fact.relation]) - {fact.value})
        answers = [_ANSWERS[fact.relation].format(country=fact.country, value=value)
                   for value in [fact.value, *rng.sample(others, min(CHOICES - 1, len(others)))]]  # fmt: skip
        choices = rng.sample(answers, len(answers))  # fewer than 4 in a world of fewer countries
        question = as_chat(row)["messages"][0]["content"] if chat else row["prompt"]
        docs.append({"question": question, "choices": choices, "answer": choices.index(answers[0]),
                     "task": fact.relation})  # fmt: skip
    data = folder / f"{LM_EVAL_TASK}.jsonl"
    write_jsonl(docs, data)
    storage.write_text(folder / f"{LM_EVAL_TASK}.yaml", (
        f"task: {LM_EVAL_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: answer\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n"
    ))  # fmt: skip
    return str(folder)


def as_chat(row: dict) -> dict:
    """A demo row as a chat row: the question (and its given text) from the user, the answer from the
    assistant; task and difficulty kept."""
    question = f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": row["output"]}]
    return {"messages": messages, "task": row["task"], "difficulty": row["difficulty"]}


def write_demo_data(
    out_dir: str | os.PathLike, *, train_rows: int, heldout_rows: int, pretrain_rows: int, seed: int,
    chat: bool = False,
) -> dict[str, str]:  # fmt: skip
    """Write the train, held-out and pretraining splits of one world as JSONL, and a multiple-choice
    lm-eval task on the held-out facts (``lm_eval_tasks``); returns their paths.

    Every fact is asked in two phrasings in train and in the third in held-out (so the two never share a
    prompt); pretraining repeats easy facts often and hard ones rarely or never. With ``chat``, train and
    held-out rows are chat rows (``messages``); pretraining stays plain text."""
    countries = -(-train_rows // (len(_QUESTIONS) * (PHRASINGS - 1)))
    facts = make_world(seed, countries)
    rng = random.Random(seed)
    train, heldout = [], []
    for fact in facts:
        phrasings = rng.sample(range(PHRASINGS), PHRASINGS)
        train += [_row(fact, p) for p in phrasings[:-1]]
        heldout.append((fact, _row(fact, phrasings[-1])))
    train = rng.sample(train, min(train_rows, len(train)))
    heldout = rng.sample(heldout, min(heldout_rows, len(heldout)))
    splits = {
        "train": train,
        "heldout": [row for _, row in heldout],
        "pretrain": generate_rows(facts, pretrain_rows, seed + 1, PRETRAIN_WEIGHTS),
    }
    paths = {}
    if chat:
        splits["train"], splits["heldout"] = (
            [as_chat(r) for r in splits["train"]],
            [as_chat(r) for r in splits["heldout"]],
        )
    for split, rows in splits.items():
        path = Location.of(out_dir) / f"demo_{split}.jsonl"
        write_jsonl(rows, path)
        paths[split] = str(path)
    paths["lm_eval_tasks"] = write_lm_eval_task(Location.of(out_dir) / "lm_eval_tasks", heldout, facts, chat, seed)
    return paths
