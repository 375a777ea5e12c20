"""The Ray Train distill job on the session's local Ray: 2 DDP and 2 FSDP workers train the same student as
one worker alone (the same Trainer in this process, no Ray)."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM

from srd_ray.data import load_source
from srd_ray.distill.driver import run_training
from srd_ray.distill.losses import LossSettings
from srd_ray.distill.state import MODEL_DIR
from srd_ray.distill.worker import LocalHost, StagePlan, Trainer, TrainingJob
from srd_ray.spec import DataSourceSpec, DataSpec, StageSpec, StudentModelSpec, TeacherModelSpec, TrainingSpec
from tests.processes import assert_vllm_serves

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def rows(demo_data) -> pa.Table:
    data = DataSpec(train=DataSourceSpec(path=demo_data["train"], max_rows=32), max_response_tokens=32)
    return load_source(data.train, data, label="train").table


def distill_job(strategy: str, workers: int, tiny_models, out) -> TrainingJob:
    """3 steps of 16 rows (8 per micro-batch over the workers, 2 micro-batches a step)."""
    name = f"{strategy}_x{workers}"
    return TrainingJob(
        name=name,
        # DDP also reports metrics at every log step: a barrier, so every rank must reach it equally often.
        training=TrainingSpec(num_workers=workers, strategy=strategy, batch_size=8 // workers,
                              gradient_accumulation_steps=2, log_every_steps=1,
                              report_every_log_step=strategy == "ddp"),
        data=DataSpec(train=DataSourceSpec(path="unused"), max_response_tokens=32),
        student=StudentModelSpec(path=tiny_models["student"]),
        teacher=TeacherModelSpec(path=tiny_models["teacher"]),
        plan=(StagePlan(0, ("all",), StageSpec(steps=3, kd_weight=0.5, temperature=2.0, lr=1e-3)),),
        loss=LossSettings("fkl"),
        seed=0,
        metrics_path=str(out / name / "metrics.jsonl"),
    )  # fmt: skip


def train(strategy: str, workers: int, rows: pa.Table, tiny_models, out) -> dict:
    job = distill_job(strategy, workers, tiny_models, out)
    return run_training(job, {"all": rows.select(["example_id", "prompt", "response"])}, out / job.name)


def train_alone(rows: pa.Table, tiny_models, out) -> dict:
    """The same job at one worker, in this process: the reference the distributed runs must equal."""
    job = distill_job("ddp", 1, tiny_models, out)
    host = LocalHost({"all": rows.select(["example_id", "prompt", "response"])}, out / job.name / "ck", CPU)
    Trainer(job, host).run()
    newest = max((out / job.name / "ck").glob("checkpoint-*"))
    final = host.reports[-1]
    return {"optimizer_steps": final["global_step"], "tokens_seen": final["tokens_seen"], "model": newest / MODEL_DIR}


@pytest.mark.slow
def test_one_worker_ddp_and_fsdp_train_the_same_student(ray_session, rows, tiny_models, tmp_path):
    """Same rows per step, one global token mean, same optimizer: 1 worker, 2 DDP workers (gloo) and 2 FSDP
    workers (student and teacher sharded) end with the same weights."""
    runs = {
        "single": train_alone(rows, tiny_models, tmp_path),
        "ddp": train("ddp", 2, rows, tiny_models, tmp_path),
        "fsdp": train("fsdp", 2, rows, tiny_models, tmp_path),
    }
    assert {run["optimizer_steps"] for run in runs.values()} == {3}
    assert len({run["tokens_seen"] for run in runs.values()}) == 1
    start = AutoModelForCausalLM.from_pretrained(tiny_models["student"]).state_dict()
    trained = {name: AutoModelForCausalLM.from_pretrained(run["model"]).state_dict() for name, run in runs.items()}
    for name, weight in trained["single"].items():
        for other in ("ddp", "fsdp"):
            torch.testing.assert_close(trained[other][name], weight, rtol=1e-5, atol=1e-6, msg=f"{other}: {name}")
    assert any(not torch.equal(start[n], w) for n, w in trained["single"].items()), "training changed nothing"
    assert_vllm_serves(runs["fsdp"]["model"])  # the distilled student is a checkpoint vLLM serves
