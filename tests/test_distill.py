"""The Ray Train distill job on the session's local Ray: DDP and FSDP give the same student."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM

from srd_ray.data import load_source
from srd_ray.distill.train import LossSettings, StagePlan, run_training
from srd_ray.spec import DataSourceSpec, DataSpec, ModelSpec, StageSpec, TrainingSpec


@pytest.fixture(scope="module")
def rows(demo_data) -> pa.Table:
    data = DataSpec(train=DataSourceSpec(path=demo_data["train"], max_rows=32), max_response_tokens=32)
    return load_source(data.train, data, label="train").table


def train(strategy: str, rows: pa.Table, tiny_models, out, ray) -> dict:
    return run_training(
        name=strategy,
        # DDP also reports metrics at every log step: a barrier, so every rank must reach it equally often.
        training=TrainingSpec(num_workers=2, strategy=strategy, batch_size=4, gradient_accumulation_steps=2,
                              log_every_steps=1, report_every_log_step=strategy == "ddp"),
        data=DataSpec(train=DataSourceSpec(path="unused"), max_response_tokens=32),
        student=ModelSpec(path=tiny_models["student"]),
        teacher=ModelSpec(path=tiny_models["teacher"]),
        plan=[StagePlan(0, ("all",), StageSpec(steps=3, kd_weight=0.5, temperature=2.0, lr=1e-3))],
        datasets={"all": ray.data.from_arrow(rows.select(["example_id", "prompt", "response"]))},
        loss=LossSettings("fkl"),
        seed=0,
        stage_dir=out / strategy,
    )  # fmt: skip


@pytest.mark.slow
def test_fsdp_trains_the_same_student_as_ddp(ray_session, rows, tiny_models, tmp_path):
    """Same rows, order, loss scaling and optimizer: sharding student and teacher changes no weight."""
    ddp = train("ddp", rows, tiny_models, tmp_path, ray_session)
    fsdp = train("fsdp", rows, tiny_models, tmp_path, ray_session)
    assert ddp["optimizer_steps"] == fsdp["optimizer_steps"] == 3
    assert ddp["tokens_seen"] == fsdp["tokens_seen"]
    start = AutoModelForCausalLM.from_pretrained(tiny_models["student"]).state_dict()
    by_ddp = AutoModelForCausalLM.from_pretrained(ddp["model"]).state_dict()
    by_fsdp = AutoModelForCausalLM.from_pretrained(fsdp["model"]).state_dict()
    for name, weight in by_ddp.items():
        torch.testing.assert_close(by_fsdp[name], weight, rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(start[name], weight) for name, weight in by_ddp.items()), "training changed nothing"
    if importlib.util.find_spec("vllm") is not None:  # the distilled student is a checkpoint vLLM serves
        script = (
            "import os; os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING='0', VLLM_CPU_KVCACHE_SPACE='1')\n"
            "from vllm import LLM, SamplingParams\n"
            f"llm = LLM(model={fsdp['model']!r}, dtype='float32', max_model_len=256, enforce_eager=True)\n"
            "print('VLLM_OK', len(llm.generate(['Hello'], SamplingParams(max_tokens=4))[0].outputs[0].token_ids))"
        )
        loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert "VLLM_OK" in loaded.stdout, loaded.stderr[-2000:]
