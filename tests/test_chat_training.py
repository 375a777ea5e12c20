"""#30: a teacher model that runs in the training step reads chat rows in its own chat template (here one that
injects a default system prompt the student's lacks): the teacher's logits are taken at its own positions of
the student's scored tokens, for reference rows and for the student's samples alike."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from srd_ray.distill import batches
from srd_ray.distill.batches import MicroBatch
from srd_ray.distill.losses import LossSettings, StageWeights
from srd_ray.distill.pool import RowPool
from srd_ray.distill.step import DistillationModel
from srd_ray.distill.worker import LocalHost, StagePlan, Trainer
from srd_ray.encoding import Conversation, RowFormat, prompts_of
from srd_ray.spec import DataSourceSpec, DataSpec, DistillSpec, StageSpec
from srd_ray.tiny_models import CHATML_TEMPLATE
from tests.test_trainer import make_job

TEACHER_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a teacher.<|im_end|>\n' }}{% endif %}"
    + CHATML_TEMPLATE
)
DATA = DataSpec(train=DataSourceSpec(path="unused"), max_response_tokens=32)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """A ChatML pair whose teacher's template adds a system prompt, and 24 chat rows (one multi-turn)."""
    from srd_ray.data import load_source
    from srd_ray.demo_data import write_demo_data
    from srd_ray.spec import TinyModelSpec, TinyModelsSpec
    from srd_ray.tiny_models import make_tiny_models

    out = tmp_path_factory.mktemp("chat")
    paths = write_demo_data(out / "data", train_rows=24, heldout_rows=4, pretrain_rows=40, seed=0, chat=True)
    rows = [json.loads(line) for line in Path(paths["train"]).read_text().splitlines()]
    texts = [" ".join(m["content"] for m in row["messages"]) for row in rows] + ["You are a teacher."]
    # The teacher learns a little, so that what precedes a token (its system prompt) changes its logits.
    spec = TinyModelsSpec(vocab_size=300, chat=True, pretrain_batch_size=8,
                          teacher=TinyModelSpec(hidden_size=32, num_layers=1, num_heads=1, pretrain_steps=30),
                          student=TinyModelSpec(hidden_size=32, num_layers=1, num_heads=1))  # fmt: skip
    models = make_tiny_models(out / "models", spec, texts, texts)
    teacher_tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
    teacher_tokenizer.chat_template = TEACHER_SYSTEM
    teacher_tokenizer.save_pretrained(models["teacher"])
    table = load_source(DataSourceSpec(path=paths["train"]), DATA, label="train").table
    turns = rows[0]["messages"]  # a second exchange makes the first row multi-turn
    multi = json.dumps([*turns, {"role": "user", "content": "Again?"}, turns[-1]])
    table = table.set_column(table.schema.get_field_index("messages"), "messages",
                             pa.array([multi, *table["messages"].to_pylist()[1:]]))  # fmt: skip
    return models, table.select(["example_id", "prompt", "response", "messages"])


def tokenizers(models):
    return AutoTokenizer.from_pretrained(models["student"]), AutoTokenizer.from_pretrained(models["teacher"])


def test_the_teacher_view_holds_the_students_scored_tokens_after_the_teachers_own_prompt(chat):
    models, table = chat
    student_tokenizer, teacher_tokenizer = tokenizers(models)
    texts = list(zip(prompts_of(table), table["response"].to_pylist(), strict=True))
    assert all(isinstance(prompt, Conversation) for prompt, _ in texts)
    pool = RowPool(None, student_tokenizer, DATA, False, (), teacher_tokenizer)
    teacher = pool.teacher_examples(texts)
    students = [pool.encode(*text) for text in texts]
    system = teacher_tokenizer("<|im_start|>system\nYou are a teacher.<|im_end|>\n", add_special_tokens=False)
    for s, t in zip(students, teacher, strict=True):
        assert t.input_ids == system["input_ids"] + s.input_ids  # the template's prefix, then the same tokens
        assert [x for x in t.labels if x >= 0] == [x for x in s.labels if x >= 0]
    assert sum(x >= 0 for x in students[0].labels) > sum(x >= 0 for x in students[1].labels)  # multi-turn: both turns
    # The same template as the student's: no view (nothing is encoded twice in training).
    assert RowPool(None, student_tokenizer, DATA, False, (), student_tokenizer).teacher_examples(texts) is None


def independent_forward_kl(models, student_rows, teacher_rows) -> float:
    """Σ over scored tokens of KL(p_teacher ‖ p_student) from each model's own full logits (T = 1): the
    teacher on its rendering, the student on its own, paired by scored-token order."""

    def scored_logprobs(name, rows) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(models[name]).eval()
        logprobs = []
        for row in rows:
            with torch.no_grad():
                logits = model(torch.tensor([row.input_ids])).logits[0].float()
            scored = [t for t in range(len(row.labels) - 1) if row.labels[t + 1] >= 0]
            logprobs.append(torch.log_softmax(logits[scored], dim=-1))
        return torch.cat(logprobs)

    teacher, student = scored_logprobs("teacher", teacher_rows), scored_logprobs("student", student_rows)
    return float((teacher.exp() * (teacher - student)).sum())


def test_online_kd_compares_with_the_teacher_on_its_own_rendering(chat):
    models, table = chat
    student_tokenizer, teacher_tokenizer = tokenizers(models)
    texts = list(zip(prompts_of(table.slice(0, 4)), table["response"].to_pylist()[:4], strict=True))
    student_rows = [RowFormat(student_tokenizer, DATA).example(*text) for text in texts]
    teacher_rows = [RowFormat(teacher_tokenizer, DATA).example(*text) for text in texts]
    pad = student_tokenizer.pad_token_id
    student = AutoModelForCausalLM.from_pretrained(models["student"])
    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"])
    pair = DistillationModel(student, teacher, len(student_tokenizer)).eval()

    def kd_sum(batch: MicroBatch) -> float:
        with torch.no_grad():
            _, _, kd = pair(batch.input_ids, batch.attention_mask, batch.scored.index, batch.scored.targets,
                            stage=StageWeights(1.0, 1.0), settings=LossSettings("fkl"), num_items_in_batch=1,
                            gradient_scale=1.0, chunk_tokens=64, teacher_view=batch.teacher_view)  # fmt: skip
        return float(kd)

    expected = independent_forward_kl(models, student_rows, teacher_rows)
    viewed = kd_sum(MicroBatch.of(student_rows, pad, teacher_examples=teacher_rows))
    unviewed = kd_sum(MicroBatch.of(student_rows, pad))  # the teacher fed the student's rendering: not the same
    print(f"KD sum: {viewed:.6f} with the teacher's view, {expected:.6f} computed apart, {unviewed:.6f} without")
    assert viewed == pytest.approx(expected, rel=1e-5)
    assert abs(unviewed - expected) > 0.01 * expected


def test_online_training_with_mixed_generation_gives_the_teacher_its_own_rendering(chat, tmp_path, monkeypatch):
    """A Trainer (no Ray) with the online teacher and mixed on-policy generation on the chat rows: every
    micro-batch the teacher scores (held-out rows, reference rows, the student's samples replayed from the
    buffer) carries the teacher's view."""
    models, table = chat
    views, built = [], batches.TeacherView.of

    def counting(*args, **kwargs):
        views.append(args[0])
        return built(*args, **kwargs)

    monkeypatch.setattr(batches.TeacherView, "of", counting)
    plan = (StagePlan(0, ("all",), StageSpec(steps=4, kd_weight=0.8, temperature=1.0, lr=1e-3)),)
    job = make_job(tmp_path, models, plan=plan)
    training = DistillSpec(num_workers=1, batch_size=4, log_every_steps=1, student_generation={
        "mode": "mixed", "mixed_alpha": 0.5, "replay_capacity": 8, "engine": "transformers"})  # fmt: skip
    job = type(job)(**{**job.__dict__, "data": DATA, "training": training, "heldout":
                       tuple(zip(table["example_id"].to_pylist()[:4], prompts_of(table.slice(0, 4)),
                                 table["response"].to_pylist()[:4], strict=True))})  # fmt: skip
    trainer = Trainer(job, LocalHost({"all": table}, tmp_path / "ck", torch.device("cpu")))
    trainer.run()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    sources = [m["sources"] for m in metrics if "sources" in m]
    assert trainer.state.global_step == 4 and {"reference", "buffer"} <= {name for s in sources for name in s}
    # the held-out rows' batch (built once) and one micro-batch per step, all with the teacher's view
    assert len(views) == 1 + 4, len(views)
    system = "<|im_start|>system\nYou are a teacher.<|im_end|>\n"
    teacher_tokenizer = tokenizers(models)[1]
    assert all(teacher_tokenizer.decode(rows[0].input_ids).startswith(system) for rows in views)
