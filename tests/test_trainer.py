"""The training worker without Ray (``LocalHost``, plain torch.distributed): resume, precision, LoRA,
FSDP meta-device loading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from srd_ray.data import load_source
from srd_ray.distill.losses import LossSettings
from srd_ray.distill.parallel import precision_problem, resolve_precision
from srd_ray.distill.state import MERGED_DIR, MODEL_DIR
from srd_ray.distill.strategy import full_state_dict, unwrap
from srd_ray.distill.worker import LocalHost, StagePlan, Trainer, TrainingJob
from srd_ray.models import load_model
from srd_ray.spec import (
    DataSourceSpec,
    DataSpec,
    LoraSpec,
    ModelSpec,
    StageSpec,
    StudentModelSpec,
    TeacherModelSpec,
    TrainingSpec,
)
from tests.processes import assert_vllm_serves, free_port

DATA = {"max_response_tokens": 32}
TWO_STAGES = (
    StagePlan(0, ("all",), StageSpec(steps=4, kd_weight=0.5, temperature=1.0, lr=1e-3)),
    StagePlan(1, ("all",), StageSpec(steps=6, kd_weight=0.9, temperature=2.0, lr=1e-3)),
)


def training_rows(demo_data: dict[str, str]) -> list[dict]:
    """The first 32 demo rows, as a training dataset holds them."""
    data = DataSpec(train=DataSourceSpec(path=demo_data["train"], max_rows=32), **DATA)
    return load_source(data.train, data, label="train").table.select(["example_id", "prompt", "response"]).to_pylist()


@pytest.fixture(scope="module")
def rows(demo_data) -> list[dict]:
    return training_rows(demo_data)


def make_job(out: Path, tiny_models, *, lora: LoraSpec | None = None, plan=TWO_STAGES, loss="fkl", **training):
    settings = {"num_workers": 1, "batch_size": 4, "gradient_accumulation_steps": 2, "log_every_steps": 1, **training}
    return TrainingJob(
        name="test", training=TrainingSpec(**settings),
        data=DataSpec(train=DataSourceSpec(path="unused"), **DATA),
        student=StudentModelSpec(path=tiny_models["student"], lora=lora),
        teacher=TeacherModelSpec(path=tiny_models["teacher"]), plan=plan, loss=LossSettings(loss), seed=0,
        metrics_path=str(out / "metrics.jsonl"),
    )  # fmt: skip


def step_losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["global_step"]: r["loss"] for r in map(json.loads, lines) if "event" not in r}


class Killed(Exception):
    pass


class KilledAfterCheckpoint(LocalHost):
    """Dies right after the checkpoint at ``step`` is saved, as a job killed there would."""

    def __init__(self, *args, step: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.kill_step = step

    def report(self, metrics, folder):
        super().report(metrics, folder)
        if folder is not None and metrics["global_step"] == self.kill_step:
            raise Killed


@pytest.mark.parametrize("lora", [None, LoraSpec(r=4, alpha=8, dropout=0.2)], ids=["full", "lora-dropout"])
def test_resumed_run_logs_the_same_losses_as_an_uninterrupted_one(tmp_path, tiny_models, rows, lora):
    """Killed at a mid-stage checkpoint (step 6 of 10, inside stage 2) and resumed: the same per-step
    losses. With LoRA dropout this also needs the RNG state back."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cpu = torch.device("cpu")
    Trainer(make_job(straight, tiny_models, lora=lora), LocalHost({"all": rows}, straight / "ck", cpu)).run()
    job = make_job(killed, tiny_models, lora=lora, checkpoint_every_steps=3)
    with pytest.raises(Killed):
        Trainer(job, KilledAfterCheckpoint({"all": rows}, killed / "ck", cpu, step=6)).run()
    assert max(step_losses(killed)) == 6
    Trainer(job, LocalHost({"all": rows}, killed / "ck", cpu)).run()
    expected, resumed = step_losses(straight), step_losses(killed)
    assert sorted(expected) == sorted(resumed) == list(range(1, 11))
    assert resumed == expected


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_mixed_precision_trains_on_cpu_and_lowers_the_loss(tmp_path, tiny_models, rows, precision):
    plan = (StagePlan(0, ("all",), StageSpec(steps=12, kd_weight=0.5, temperature=1.0, lr=3e-3)),)
    job = make_job(tmp_path, tiny_models, plan=plan, precision=precision)
    trainer = Trainer(job, LocalHost({"all": rows}, tmp_path / "ck", torch.device("cpu")))
    trainer.run()
    assert trainer.precision.name == precision
    assert trainer.scaler.is_enabled() == (precision == "fp16-mixed")
    losses = step_losses(tmp_path)
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (10, 11, 12)) / 3
    assert last < first - 0.1, losses


def test_precision_choices_and_the_hardware_that_lacks_them():
    assert resolve_precision("auto", torch.device("cpu")).name == "fp32"
    assert resolve_precision("fp16-mixed", torch.device("cpu")).dtype is torch.float16
    # What the driver's one-GPU probe reports is checked before any worker starts:
    problem = precision_problem("bf16-mixed", "Tesla T4", bf16_supported=False)
    assert problem and "Tesla T4" in problem and "fp16-mixed" in problem
    assert precision_problem("bf16-mixed", "NVIDIA H200", bf16_supported=True) is None
    assert precision_problem("fp16-mixed", "Tesla T4", bf16_supported=False) is None


def test_activation_checkpointing_changes_no_loss(tmp_path, tiny_models, rows):
    plan = (TWO_STAGES[0],)
    for name, checkpointing in (("plain", False), ("checkpointed", True)):
        job = make_job(tmp_path / name, tiny_models, plan=plan, activation_checkpointing=checkpointing)
        Trainer(job, LocalHost({"all": rows}, tmp_path / name / "ck", torch.device("cpu"))).run()
    plain, checkpointed = step_losses(tmp_path / "plain"), step_losses(tmp_path / "checkpointed")
    assert checkpointed == pytest.approx(plain, rel=1e-6)


def test_lora_student_updates_only_adapters_and_is_saved_merged(tmp_path, tiny_models, rows):
    lora = LoraSpec(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    job = make_job(tmp_path, tiny_models, lora=lora, plan=(TWO_STAGES[0],))
    trainer = Trainer(job, LocalHost({"all": rows}, tmp_path / "ck", torch.device("cpu")))
    trainer.run()
    trainable = {n for n, p in unwrap(trainer.model).student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)

    (checkpoint,) = (tmp_path / "ck").glob("checkpoint-*")
    assert (checkpoint / MODEL_DIR / "adapter_config.json").exists()
    before = load_file(Path(tiny_models["student"]) / "model.safetensors")
    merged = load_model(ModelSpec(path=str(checkpoint / MERGED_DIR))).state_dict()
    for name, weight in merged.items():
        changed = not torch.equal(weight, before[name]) if name in before else None
        if "q_proj" in name or "v_proj" in name:
            assert changed, f"{name}: the adapter's update is merged in"
        elif changed is not None:
            assert not changed, f"{name} is not a LoRA target and must not change"
    assert_vllm_serves(checkpoint / MERGED_DIR)


def test_teacher_adapter_is_merged_at_load(tmp_path, tiny_models, monkeypatch):
    from peft import LoraConfig, get_peft_model

    monkeypatch.setenv("SRD_CACHE_DIR", str(tmp_path / "cache"))
    base = load_model(ModelSpec(path=tiny_models["teacher"]))
    adapted = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "adapter")
    expected = adapted.merge_and_unload().state_dict()
    spec = TeacherModelSpec(path=tiny_models["teacher"], adapter=str(tmp_path / "adapter"))
    merged = load_model(spec).state_dict()
    for name, weight in expected.items():
        torch.testing.assert_close(merged[name], weight, msg=name)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"],
                           load_model(ModelSpec(path=tiny_models["teacher"])).state_dict()[
                               "model.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    merges = [path for path in (tmp_path / "cache" / "merged").iterdir() if not path.name.startswith(".")]
    assert len(merges) == 1, "merged once per node (beside its lock file), then reused"


def _shard_and_compare(rank: int, port: int, tiny_models: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    job = make_job(Path(out), tiny_models, strategy="fsdp", num_workers=2)
    trainer = Trainer(job, LocalHost({}, Path(out) / "ck", torch.device("cpu")))
    model = trainer.build_model(None)
    results = {}
    for role in ("student", "teacher"):
        module = model.student if role == "student" else model.teacher.lm
        expected = load_model(ModelSpec(path=tiny_models[role]))
        sharded = full_state_dict(module)
        local = {n: p.to_local().numel() for n, p in module.named_parameters()}
        results[role] = {
            "max_difference": max(float((sharded[n] - w).abs().max()) for n, w in expected.state_dict().items()),
            "buffers_equal": all(torch.equal(b, dict(expected.named_buffers())[n]) for n, b in module.named_buffers()),
            "local_fraction": sum(local.values()) / sum(p.numel() for p in expected.parameters()),
            "tied": module.get_output_embeddings().weight is module.get_input_embeddings().weight,
        }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_builds_on_meta_and_loads_weights_equal_to_from_pretrained(tmp_path, tiny_models):
    mp.spawn(_shard_and_compare, args=(free_port(), tiny_models, str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for role, result in results.items():
            assert result["max_difference"] == 0.0, (rank, role)
            assert result["buffers_equal"], (rank, role)  # rotary inv_freq and other non-persistent buffers
            assert result["tied"], (rank, role)
            assert 0.4 < result["local_fraction"] < 0.6, f"each worker holds about half of the {role}"


def test_metrics_reach_tensorboard_and_mlflow_readers(tmp_path, tiny_models, rows):
    """The libraries' own readers load what training wrote: TensorBoard's event accumulator and MLflow's
    client, per step, with the held-out KD loss; a resumed stage continues the same MLflow run."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from srd_ray.spec import MetricsSpec

    job = make_job(tmp_path, tiny_models, plan=(TWO_STAGES[0],), metrics=MetricsSpec(tensorboard=True, mlflow=True))
    job = type(job)(**{**job.__dict__, "heldout": tuple((r["example_id"], r["prompt"], r["response"])
                                                         for r in rows[:4])})  # fmt: skip
    Trainer(job, LocalHost({"all": rows}, tmp_path / "ck", torch.device("cpu"))).run()

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    losses = events.Scalars("test/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4]
    assert [e.value for e in losses] == pytest.approx(list(step_losses(tmp_path).values()), rel=1e-6)
    assert {"test/lr", "test/tokens_per_s", "test/padding_fraction", "test/heldout_kd"} <= set(events.Tags()["scalars"])

    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path.parent / 'mlflow' / 'mlflow.db').resolve()}")
    (run,) = client.search_runs([client.get_experiment_by_name("srd").experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert len(client.get_metric_history(run.info.run_id, "heldout_kd")) == 2  # before training, after the stage
    Trainer(job, LocalHost({"all": rows}, tmp_path / "ck", torch.device("cpu"))).run()  # resumes: nothing left
    assert len(client.search_runs([client.get_experiment_by_name("srd").experiment_id])) == 1


def test_a_resumed_teacher_sft_does_not_merge_the_adapter_again(tmp_path, tiny_models, monkeypatch):
    """Review C1: a teacher fine-tuned with ``models.teacher.adapter`` resumes from checkpoint weights that
    already hold the adapter; loading them must not merge it a second time."""
    from peft import LoraConfig, get_peft_model

    from srd_ray.distill.model_factory import ModelFactory
    from srd_ray.models import load_tokenizer

    monkeypatch.setenv("SRD_CACHE_DIR", str(tmp_path / "cache"))
    adapted = get_peft_model(load_model(ModelSpec(path=tiny_models["teacher"])),
                             LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))  # fmt: skip
    adapted.save_pretrained(tmp_path / "adapter")
    merged = adapted.merge_and_unload()
    merged.save_pretrained(tmp_path / "checkpoint" / MODEL_DIR)  # what a checkpoint of the SFT holds
    teacher = TeacherModelSpec(path=tiny_models["teacher"], adapter=str(tmp_path / "adapter"))
    job = make_job(tmp_path, tiny_models, loss="sft")
    job = type(job)(**{**job.__dict__, "student": teacher, "teacher": None})
    tokenizer = load_tokenizer(teacher)
    resumed = ModelFactory(job, tokenizer, torch.device("cpu"), tmp_path / "checkpoint", rank=0).student("cpu")
    for name, weight in merged.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], weight, msg=name)
    fresh = ModelFactory(job, tokenizer, torch.device("cpu"), None, rank=0).student("cpu")
    torch.testing.assert_close(fresh.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                               merged.state_dict()["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip


def test_a_step_fp16_skips_does_not_advance_the_learning_rate():
    """Review C7: GradScaler skips the optimizer step on inf/NaN gradients; the schedule must skip it too."""
    from srd_ray.distill.step import optimizer_stepped

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    for gradient, steps in (([1.0, float("inf"), 1.0], False), ([1.0, 1.0, 1.0], True)):
        scaler.scale(weight.sum()).backward()
        weight.grad = torch.tensor(gradient)
        scaler.unscale_(optimizer)
        before = weight.detach().clone()
        assert optimizer_stepped(scaler, optimizer) == steps
        assert torch.equal(weight.detach(), before) != steps
        optimizer.zero_grad()
    assert optimizer_stepped(torch.amp.GradScaler("cpu", enabled=False), optimizer)


def test_a_checkpoint_resumes_only_on_as_many_workers_as_wrote_it(tmp_path, tiny_models, rows):
    """Review C8: the step plan and every worker's RNG stream depend on the worker count."""
    from srd_ray.distill.state import TrainState
    from srd_ray.errors import DataError

    job = make_job(tmp_path, tiny_models, plan=(TWO_STAGES[0],))
    Trainer(job, LocalHost({"all": rows}, tmp_path / "ck", torch.device("cpu"))).run()
    (checkpoint,) = (tmp_path / "ck").glob("checkpoint-*")
    state = TrainState.load(checkpoint)
    state.rng = state.rng * 2  # as if two workers had written it
    state.save(checkpoint)
    with pytest.raises(DataError, match=r"written by 2 worker\(s\), this run has 1 \(test.num_workers\)"):
        Trainer(job, LocalHost({"all": rows}, tmp_path / "ck", torch.device("cpu"))).run()
