"""The parallel strategies (``srd_ray.distill.strategy``) on gloo, in-process at one worker (FSDP is allowed
there, so one GPU exercises it) and spawned at two: the findings of ../shared/reviews/cluster-gpu-review.md
that a CPU can reproduce."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from srd_ray.distill.parallel import Precision, gpu_facts
from srd_ray.distill.step import FrozenTeacher
from srd_ray.distill.strategy import FullySharded, local_piece
from srd_ray.distill.worker import LocalHost, Trainer
from srd_ray.errors import ModelError
from srd_ray.models import load_model
from srd_ray.spec import LoraSpec, ModelSpec
from tests.processes import free_port
from tests.test_trainer import TWO_STAGES, Killed, KilledAfterCheckpoint, make_job, step_losses, training_rows

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def rows(demo_data) -> list[dict]:
    return training_rows(demo_data)


@pytest.fixture
def gloo_world_1():
    """A one-process gloo group: FSDP2 needs a process group even alone."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def heldout_job(out: Path, tiny_models: dict, rows: list[dict], **training):
    job = make_job(out, tiny_models, strategy="fsdp", **training)
    heldout = tuple((r["example_id"], r["prompt"], r["response"]) for r in rows[:4])
    return type(job)(**{**job.__dict__, "heldout": heldout})


def test_fsdp_at_one_worker_with_heldout_rows_resumes_with_the_same_losses(tmp_path, tiny_models, rows, gloo_world_1):
    """The held-out metric is a forward without backward: FSDP leaves the student's root gathered after it,
    and a checkpoint then found parameters the optimizer does not hold (KeyError at the first save). The
    strategy reshards after it. Killed at a mid-stage checkpoint and resumed: the same per-step losses."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    Trainer(heldout_job(straight, tiny_models, rows), LocalHost({"all": rows}, straight / "ck", CPU)).run()
    job = heldout_job(killed, tiny_models, rows, checkpoint_every_steps=3)
    with pytest.raises(Killed):
        Trainer(job, KilledAfterCheckpoint({"all": rows}, killed / "ck", CPU, step=6)).run()
    trainer = Trainer(job, LocalHost({"all": rows}, killed / "ck", CPU))
    trainer.run()
    assert trainer.strategy.name == "fsdp" and trainer.strategy.world == 1
    assert step_losses(killed) == step_losses(straight) and len(step_losses(straight)) == 10
    heldout = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["after_stage"] for r in heldout if r.get("event") == "heldout"] == [-1, 0, 1]


def test_the_fsdp_teacher_is_a_bf16_root_of_its_own_released_after_each_micro_batch(
    tmp_path, tiny_models, rows, gloo_world_1
):
    """Review F5: the frozen bf16 teacher and the fp32 student never share an FSDP group (no mixed-dtype
    root, no backward prefetch into teacher layers), and the teacher's root (embeddings, norm, head) is not
    held from a micro-batch's forward through its backward."""
    from torch.distributed.tensor import DTensor

    job = make_job(tmp_path, tiny_models, strategy="fsdp", plan=(TWO_STAGES[0],))
    job = type(job)(**{**job.__dict__, "teacher": job.teacher.model_copy(update={"dtype": "bfloat16"})})
    trainer = Trainer(job, LocalHost({"all": rows}, tmp_path / "ck", CPU))
    trainer.run()
    pair = trainer.model
    teacher = pair.teacher
    assert isinstance(teacher, FrozenTeacher) and "teacher" not in dict(pair.named_children())
    assert not any(name.startswith("teacher") for name, _ in pair.named_parameters())
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pair.parameters()} == {torch.float32}
    head = teacher.lm.get_output_embeddings().weight
    assert isinstance(head, DTensor), "the teacher's root is resharded once a micro-batch's loss is done"
    losses = step_losses(tmp_path)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())


def test_a_model_fsdp_cannot_shard_is_refused_by_name(tiny_models):
    """Review F15: no decoder layer found means one unit gathered whole; say so instead."""
    model = load_model(ModelSpec(path=tiny_models["student"]))
    model._no_split_modules = []
    strategy = FullySharded(CPU, rank=0, world=1, precision=Precision("fp32"))
    with pytest.raises(ModelError, match="no decoder layer found in LlamaForCausalLM"):
        strategy._shard(model, root=model)


def test_the_bf16_probe_does_not_count_emulation(monkeypatch):
    """Review F13: V100/T4 report bf16 'supported' by emulation; an explicit bf16-mixed must fail there."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kwargs: calls.append(kwargs) or False)
    assert gpu_facts() == ("Tesla V100", False)
    assert calls == [{"including_emulation": False}]


# --------------------------------------------------------------------------------------------------------
# Two workers


def _two_workers(rank: int, port: int, tiny_models: dict, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    result = {}
    # Review F10: each worker's piece cut on the CPU equals distribute_tensor's, uneven shapes included.
    mesh = init_device_mesh("cpu", (2,))
    for shape in [(5, 3), (1, 4), (7,)]:
        full = torch.arange(torch.tensor(shape).prod().item(), dtype=torch.float32).reshape(shape)
        placed = distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)
        result[str(shape)] = torch.equal(local_piece(full, placed), placed.to_local())
    # Review F9: full state dicts land on rank 0 only; a LoRA student gathers its adapters only.
    for name, lora in (("full", None), ("lora", LoraSpec(r=2, alpha=4))):
        job = make_job(Path(out) / name, tiny_models, strategy="fsdp", num_workers=2, lora=lora)
        trainer = Trainer(job, LocalHost({}, Path(out) / name / "ck", CPU))
        model = trainer.build_model(None)
        state = trainer.strategy.student_state_dict(model, trainable_only=lora is not None)
        result[name] = None if state is None else sorted(state)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_fsdp_workers_cut_shards_on_the_cpu_and_gather_state_to_rank_0_only(tmp_path, tiny_models):
    mp.spawn(_two_workers, args=(free_port(), tiny_models, str(tmp_path)), nprocs=2)
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    for shape in ("(5, 3)", "(1, 4)", "(7,)"):
        assert rank0[shape] and rank1[shape], shape
    assert rank1["full"] is None and rank1["lora"] is None, "other ranks hold no copy"
    expected = sorted(load_model(ModelSpec(path=tiny_models["student"])).state_dict())
    assert rank0["full"] == expected
    assert rank0["lora"] and all("lora_" in name for name in rank0["lora"])
