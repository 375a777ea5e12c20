"""Reflection core with a real tiny model loaded through from_pretrained (no Ray)."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from srd_ray.data import load_source
from srd_ray.engines import TransformersEngine
from srd_ray.errors import ModelError
from srd_ray.models import check_model_path
from srd_ray.reflect import score_table, split_into_shards
from srd_ray.scoring import rouge_l
from srd_ray.spec import DataSourceSpec, DataSpec, GenerationSpec, ModelSpec


@pytest.fixture(scope="module")
def rows(demo_data) -> pa.Table:
    data = DataSpec(train=DataSourceSpec(path=demo_data["train"], max_rows=10))
    return load_source(data.train, data, label="train").table


def test_score_table_adds_both_signals(tiny_models, rows):
    engine = TransformersEngine(ModelSpec(path=tiny_models["student"]), max_prompt_tokens=256, max_response_tokens=64)
    scored = score_table(rows, engine, GenerationSpec(max_new_tokens=12), batch_size=4)
    assert scored.num_rows == rows.num_rows
    assert scored["example_id"].to_pylist() == rows["example_id"].to_pylist()
    for answer, refs, score in zip(
        scored["student_answer"].to_pylist(),
        scored["references"].to_pylist(),
        scored["rouge_l"].to_pylist(),
        strict=True,
    ):
        assert score == pytest.approx(rouge_l(answer, refs))
    assert all(ce > 0 for ce in scored["student_ce"].to_pylist())
    assert not any(scored["prompt_truncated"].to_pylist())


def test_student_ce_is_mean_response_token_cross_entropy(tiny_models, rows):
    """Recompute the teacher-forced CE by hand for one row: prompt and response tokenized separately."""
    path = tiny_models["student"]
    engine = TransformersEngine(ModelSpec(path=path), max_prompt_tokens=256, max_response_tokens=64)
    prompt, response = rows["prompt"][0].as_py(), rows["response"][0].as_py()
    (ce,), (count,) = engine.response_cross_entropy([prompt], [response])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + response_ids])).logits[0]
    log_probs = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    expected = -log_probs[torch.arange(len(response_ids)), torch.tensor(response_ids)].mean().item()
    assert count == len(response_ids)
    assert ce == pytest.approx(expected, rel=1e-4)
    # Batching with other rows (padding) must not change a row's CE.
    batched, _ = engine.response_cross_entropy([prompt, rows["prompt"][1].as_py()], [response, "x"])
    assert batched[0] == pytest.approx(ce, rel=1e-4)


def test_long_prompts_are_left_truncated_and_flagged(tiny_models):
    engine = TransformersEngine(ModelSpec(path=tiny_models["student"]), max_prompt_tokens=8, max_response_tokens=8)
    answers, truncated = engine.generate(["word " * 50, "hi"], GenerationSpec(max_new_tokens=3), seed=1)
    assert truncated == [True, False] and len(answers) == 2


def test_shards_follow_input_position(rows):
    shuffled = rows.take([3, 1, 0, 2, 4, 5, 9, 8, 7, 6])
    shards = split_into_shards(shuffled, 4)
    assert [s.num_rows for s in shards] == [4, 4, 2]
    assert shards[0]["input_position"].to_pylist() == [0, 1, 2, 3]
    assert shards[2]["shard_index"].to_pylist() == [2, 2]


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        check_model_path(ModelSpec(path=str(tmp_path / "nope")), "student")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"no \*\.safetensors weights"):
        check_model_path(ModelSpec(path=str(tmp_path)), "teacher")
