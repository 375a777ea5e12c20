"""Student generation (GKD / DistiLLM): the step-source policy, the replay buffer, generated rows, and
on-policy training in the worker (``LocalHost``: no Ray) with a resume that keeps the buffer."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from srd_ray.distill.batches import MicroBatch
from srd_ray.distill.losses import LossSettings, StageWeights
from srd_ray.distill.parallel import Precision
from srd_ray.distill.step import StepSettings, train_step
from srd_ray.distill.strategy import DataParallel
from srd_ray.distill.student_generation import (
    InWorkerSampler,
    PackedWeights,
    ReplayBuffer,
    Source,
    StepSourcePolicy,
    StudentGeneration,
    generated_example,
    prompt_ids,
    sample_seeds,
    sampling_settings,
    step_uniform,
)
from srd_ray.distill.worker import LocalHost, Trainer
from srd_ray.errors import DataError, SpecError
from srd_ray.models import IGNORE_INDEX, encode_example, load_tokenizer
from srd_ray.spec import DataSpec, DistillSpec, ModelSpec, StudentGenerationSpec
from tests.test_trainer import DATA, Killed, KilledAfterCheckpoint, make_job, step_losses


def one_worker() -> DataParallel:
    return DataParallel(torch.device("cpu"), rank=0, world=1, precision=Precision("fp32"))


STEPS = 20_000


def frequencies(policy: StepSourcePolicy, total: int, buffer_full: bool) -> dict[str, float]:
    counts: dict[str, int] = {}
    for step in range(total):
        source = policy.choose(step, total, buffer_full)
        key = f"{source.train_on.value}{'+generate' if source.generate else ''}{'+push' if source.push else ''}"
        counts[key] = counts.get(key, 0) + 1
    return {key: count / total for key, count in counts.items()}


def close(observed: float, expected: float) -> bool:
    """Within 4 standard errors of a binomial proportion over STEPS draws."""
    return abs(observed - expected) <= 4 * (expected * (1 - expected) / STEPS) ** 0.5 + 1e-9


def policy(seed: int = 0, **settings) -> StepSourcePolicy:
    return StepSourcePolicy(StudentGenerationSpec(**settings), seed)


def test_on_policy_always_generates_and_mixed_generates_with_probability_alpha():
    assert frequencies(policy(mode="on"), STEPS, False) == {"samples+generate": 1.0}
    assert frequencies(policy(mode="off"), STEPS, False) == {"reference": 1.0}
    mixed = frequencies(policy(mode="mixed", mixed_alpha=0.3), STEPS, False)
    assert set(mixed) == {"buffer+generate+push", "reference"}
    assert close(mixed["buffer+generate+push"], 0.3)


@pytest.mark.parametrize(
    ("ratio", "mean_threshold"), [("decreasing", 0.5 * 0.6), ("constant", 0.5 * 0.6), ("increasing", 0.5 * 0.6)]
)
def test_adaptive_branch_frequencies_follow_the_threshold_schedule(ratio, mean_threshold):
    """Over the run the mean threshold is init/2 for all three schedules (a line from init to 0, 0.5 init,
    a line from 0 to init): with a full buffer, fresh samples at that rate, the buffer for the rest of
    r < init, references otherwise. With a buffer still filling, every r < init generates."""
    settings = {"mode": "adaptive", "init_threshold": 0.6, "replay_ratio": ratio}
    full = frequencies(policy(**settings), STEPS, True)
    assert close(full["samples+generate+push"], mean_threshold)
    assert close(full["buffer"], 0.6 - mean_threshold)
    assert close(full["reference"], 0.4)
    filling = frequencies(policy(**settings), STEPS, False)
    assert close(filling["samples+generate+push"], 0.6) and close(filling["reference"], 0.4)


def test_adaptive_thresholds_and_draws_are_per_step_and_worker_independent():
    p = policy(mode="adaptive", init_threshold=0.8)
    assert p.threshold(0, 100) == pytest.approx(0.8) and p.threshold(50, 100) == pytest.approx(0.4)
    assert policy(mode="adaptive", init_threshold=0.8, replay_ratio="constant").threshold(70, 100) == 0.4
    assert policy(mode="adaptive", init_threshold=0.8, replay_ratio="increasing").threshold(25, 100) == 0.2
    # A draw depends on (seed, step) only: any worker, any order, a resumed run.
    forward = [step_uniform(3, s) for s in range(50)]
    assert [step_uniform(3, s) for s in reversed(range(50))] == forward[::-1]
    assert forward != [step_uniform(4, s) for s in range(50)]
    # The branch taken for a draw, at the boundaries.
    decreasing = policy(mode="adaptive", init_threshold=0.5)
    assert decreasing.choose_for_draw(0.30, 60, 100, True).train_on is Source.BUFFER  # threshold 0.2 <= r < 0.5
    assert decreasing.choose_for_draw(0.10, 60, 100, True).train_on is Source.SAMPLES
    assert decreasing.choose_for_draw(0.30, 60, 100, False).train_on is Source.SAMPLES  # buffer not yet full
    assert decreasing.choose_for_draw(0.70, 60, 100, False).train_on is Source.REFERENCE


def test_replay_buffer_keeps_the_newest_rows_and_draws_without_replacement():
    buffer = ReplayBuffer(capacity=5)
    buffer.push([[1], [2], [3]], [[11], [12], [13]])
    assert len(buffer) == 3 and not buffer.full
    buffer.push([[4], [5], [6], [7]], [[14], [15], [16], [17]])
    assert buffer.full and buffer.prompts == [[3], [4], [5], [6], [7]]  # first in, first out
    assert buffer.responses == [[13], [14], [15], [16], [17]]
    prompts, responses, teacher_prompts = buffer.draw(4, seed=0, step=9)
    assert len({p[0] for p in prompts}) == 4 and all(r[0] == p[0] + 10 for p, r in zip(prompts, responses, strict=True))
    assert teacher_prompts == prompts  # no row pushed with a teacher rendering of its own
    assert buffer.draw(4, seed=0, step=9) == (prompts, responses, prompts)  # every worker draws the same rows
    seen = {p[0] for step in range(200) for p in buffer.draw(2, seed=0, step=step)[0]}
    assert seen == {3, 4, 5, 6, 7}
    with pytest.raises(ValueError, match="holds 5 rows; a step needs 6"):
        buffer.draw(6, seed=0, step=0)


def test_replay_buffer_state_survives_a_weights_only_checkpoint(tmp_path):
    buffer = ReplayBuffer(capacity=4)
    buffer.push([[1, 2], [3]], [[4, 5, 6], [7]])
    buffer.push([[8]], [[9]], teacher_prompts=[[0, 8]])  # a row the teacher renders its own way
    torch.save({"replay": buffer.state()}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)["replay"]
    restored = ReplayBuffer.from_state(state, capacity=4)
    assert restored == buffer
    newest = ReplayBuffer.from_state(state, capacity=1)  # a smaller capacity keeps the newest
    assert (newest.prompts, newest.teacher_prompts) == ([[8]], [[0, 8]])
    assert ReplayBuffer.from_state(None, capacity=3) == ReplayBuffer(3)
    before = ReplayBuffer.from_state({"prompts": [[1]], "responses": [[2]]}, capacity=2)  # an older checkpoint
    assert before.draw(1, seed=0, step=0) == ([[1]], [[2]], [[1]])


def test_generated_rows_are_labelled_with_the_sampled_tokens(tiny_models):
    tokenizer = load_tokenizer(ModelSpec(path=tiny_models["student"]))
    example = encode_example(tokenizer, "Where is the blue tower?", "In the north.", 64, 16)
    prompt = prompt_ids(example)
    assert example.input_ids[: len(prompt)] == prompt and example.labels[len(prompt)] != IGNORE_INDEX
    sampled = [7, 8, 9, tokenizer.eos_token_id]
    row = generated_example(prompt, sampled)
    assert row.input_ids == prompt + sampled
    assert [label for label in row.labels if label != IGNORE_INDEX] == sampled
    assert row.scored_tokens == len(sampled)


class RecordingSampler:
    """Samples fixed tokens and records what it was asked."""

    def __init__(self):
        self.syncs, self.calls = [], []

    def sync(self, model):
        self.syncs.append(model)

    def sample(self, prompts, seed):
        self.calls.append((prompts, seed))
        return [[len(p), 5, 2] for p in prompts]

    def close(self):
        pass


def test_rows_for_generates_pushes_draws_and_syncs_every_n_steps():
    sampler = RecordingSampler()
    settings = StudentGenerationSpec(mode="mixed", mixed_alpha=1.0, replay_capacity=4)
    generation = StudentGeneration(StepSourcePolicy(settings, 0), ReplayBuffer(4), sampler, 2, total_steps=10)
    prompts = [[1, 2], [3, 4, 5]]
    for step in range(5):
        source = generation.choose(step)
        rows, teacher_rows = generation.rows_for(source, step, prompts, model=f"model@{step}")
        assert source.train_on is Source.BUFFER and len(rows) == 2 and teacher_rows is None
        for row in rows:  # drawn from the buffer: each row's labels are the tokens sampled for its prompt
            prompt_length = len(row.input_ids) - 3
            assert row.input_ids[prompt_length:] == [prompt_length, 5, 2]
            assert [label for label in row.labels if label != IGNORE_INDEX] == [prompt_length, 5, 2]
    assert sampler.syncs == ["model@0", "model@2", "model@4"]  # sync_every_steps 2
    assert len(generation.buffer) == 4 and len(sampler.calls) == 5


def test_in_worker_sampler_samples_exactly_what_generate_samples(tiny_models):
    from srd_ray.distill.step import DistillationModel
    from srd_ray.engines import generate_tokens
    from srd_ray.models import load_model

    spec = ModelSpec(path=tiny_models["student"])
    tokenizer, student = load_tokenizer(spec), load_model(spec).train()
    settings = sampling_settings(StudentGenerationSpec(mode="on"), DataSpec(train={"path": "x"}, **DATA))
    sampler = InWorkerSampler(settings, tokenizer, rank=0, world=1, strategy=one_worker())
    sampler.sync(DistillationModel(student, None, len(tokenizer)))
    prompts = [tokenizer("Where is the blue tower?")["input_ids"], tokenizer("Name a colour.")["input_ids"]]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    sampled = sampler.sample(prompts, seed=42)
    assert torch.equal(torch.get_rng_state(), state)  # the training RNG stream is untouched
    assert student.training  # back in training mode
    seeds = sample_seeds(42, 2)
    assert sampled == generate_tokens(student.eval(), prompts, settings, 0, tokenizer, row_seeds=seeds)
    # Each row's sample depends on its own seed only: alone, or in a batch with others, it is the same.
    alone = [
        generate_tokens(student, [p], settings, 0, tokenizer, row_seeds=[s])[0]
        for p, s in zip(prompts, seeds, strict=True)
    ]
    assert sampled == alone
    assert all(0 < len(ids) <= DATA["max_response_tokens"] for ids in sampled)
    assert all(tokenizer.eos_token_id not in ids[:-1] for ids in sampled)  # ends at the first EOS


def _sample_sharded(rank: int, port: int, tiny_models: dict, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    trainer = Trainer(make_job(Path(out), tiny_models, strategy="fsdp", num_workers=2),
                      LocalHost({}, Path(out) / "ck", torch.device("cpu")))  # fmt: skip
    settings = sampling_settings(StudentGenerationSpec(mode="on"), DataSpec(train={"path": "x"}, **DATA))
    sampler = InWorkerSampler(settings, trainer.tokenizer, rank=rank, world=2, strategy=trainer.strategy)
    # A fresh build: sampling is the first forward, as after any resume (review F2).
    model = trainer.build_model(None)
    sampler.sync(model)
    prompts = [trainer.tokenizer(text)["input_ids"] for text in SHARDED_PROMPTS]
    samples = sampler.sample(prompts, seed=42)
    # Then a training step on the samples: FSDP's root must have been initialised by a root forward.
    rows = [generated_example(p, s) for p, s in zip(prompts, samples, strict=True)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    settings = StepSettings(StageWeights(0.5, 1.0), LossSettings("fkl"), 16, 1.0, 2)
    result = train_step(
        model, [MicroBatch.of(rows[rank::2], trainer.tokenizer.pad_token_id)], sum(r.scored_tokens for r in rows),
        optimizer=optimizer, scheduler=torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0),
        scaler=trainer.precision.grad_scaler(trainer.device), settings=settings, precision=trainer.precision,
        device=trainer.device,
    )  # fmt: skip
    record = {"samples": samples, "grad_norm": float(result.grad_norm)}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


SHARDED_PROMPTS = ["Where is the blue tower?", "Name a colour.", "Count to three."]


@pytest.mark.slow
def test_fsdp_workers_sample_their_shares_in_step_and_share_them(tmp_path, tiny_models):
    """Two FSDP workers (gloo) each sample their share of 3 prompts with the freshly built sharded student
    (synced_gpus: a worker that is done keeps stepping while the other samples), then all-gather: both get
    exactly what one unsharded student samples for all 3 prompts (each row has its own seed, so the samples
    do not depend on the number of workers: review C6), and then train a step on them (review F2: the
    first forward was generate's, through the root), agreeing on the global gradient norm."""
    import torch.multiprocessing as mp

    from srd_ray.engines import generate_tokens
    from srd_ray.models import load_model
    from tests.processes import free_port

    mp.spawn(_sample_sharded, args=(free_port(), tiny_models, str(tmp_path)), nprocs=2)
    spec = ModelSpec(path=tiny_models["student"])
    tokenizer, student = load_tokenizer(spec), load_model(spec).eval()
    settings = sampling_settings(StudentGenerationSpec(mode="on"), DataSpec(train={"path": "x"}, **DATA))
    prompts = [tokenizer(text)["input_ids"] for text in SHARDED_PROMPTS]
    expected = generate_tokens(student, prompts, settings, 0, tokenizer, row_seeds=sample_seeds(42, len(prompts)))
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for record in records:
        assert record["samples"] == expected
    assert records[0]["grad_norm"] == pytest.approx(records[1]["grad_norm"]) and records[0]["grad_norm"] > 0


# --------------------------------------------------------------------------------------------------------
# Spec


def test_packed_weights_travel_out_of_band_and_come_back_bit_exact():
    import pickle

    weights = {
        "fp32": torch.randn(3, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "fp16": torch.randn(2, 2).half(),
        "transposed": torch.randn(4, 3).t(),
    }
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(PackedWeights.of(weights), protocol=5, buffer_callback=buffers.append)
    # What Ray does with NumPy arrays: the bytes go beside the pickle, which stays small.
    assert len(buffers) == len(weights) and len(payload) < 2000
    back = pickle.loads(payload, buffers=buffers).tensors()
    for name, tensor in weights.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_spec_refuses_generation_without_a_teacher_signal_per_sample():
    with pytest.raises(ValueError, match=r"distill\.loss is sft"):
        DistillSpec(loss="sft", student_generation={"mode": "on"})
    with pytest.raises(ValueError, match="teacher_signal topk stores"):
        DistillSpec(teacher_signal="topk", student_generation={"mode": "mixed"})
    with pytest.raises(ValueError, match="mixed_alpha"):
        DistillSpec(student_generation={"mode": "mixed", "mixed_alpha": 1.5})
    with pytest.raises(ValueError, match="replay_ratio"):
        DistillSpec(student_generation={"mode": "adaptive", "replay_ratio": "sometimes"})
    DistillSpec(student_generation={"mode": "adaptive", "replay_ratio": "increasing", "engine": "transformers"})


def test_lora_students_sample_in_the_workers(tmp_path):
    from srd_ray.distill_stage import generation_engine
    from srd_ray.spec import JobSpec

    def spec(**generation):
        return JobSpec.model_validate({
            "run": {"name": "x", "output_dir": str(tmp_path)}, "data": {"train": {"path": "x"}},
            "models": {"teacher": {"path": "t"}, "student": {"path": "s", "lora": {"r": 4}}},
            "distill": {"student_generation": {"mode": "on", **generation}},
        })  # fmt: skip

    assert generation_engine(spec(engine="auto")) == "transformers"
    with pytest.raises(SpecError, match=r"student_generation\.engine is vllm, but a LoRA student"):
        generation_engine(spec(engine="vllm"))


# --------------------------------------------------------------------------------------------------------
# Training on generated rows (LocalHost, the transformers sampler)


def generation_job(out: Path, tiny_models, mode: str, **training):
    job = make_job(out, tiny_models, loss="jsd", **training)
    spec = DistillSpec(
        **job.training.model_dump(), loss="jsd",
        student_generation={"mode": mode, "mixed_alpha": 0.5, "replay_capacity": 24, "engine": "transformers"},
    )  # fmt: skip
    return dataclasses.replace(job, training=spec)


def records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "event" not in r]


def test_mixed_run_trains_on_samples_and_references_and_logs_its_time(tmp_path, tiny_models, rows):
    out = tmp_path / "run"
    Trainer(generation_job(out, tiny_models, "mixed"), LocalHost({"all": rows}, out / "ck", torch.device("cpu"))).run()
    logged = records(out)
    assert len(logged) == 10
    sources = [next(iter(r["sources"])) for r in logged]
    policy = StepSourcePolicy(StudentGenerationSpec(mode="mixed"), 0)
    assert sources == [policy.choose(s, 10, False).train_on.value for s in range(10)]
    assert {"buffer", "reference"} == set(sources)
    generated = [r for r in logged if "buffer" in r["sources"]]
    assert all(r["generate_s"] > 0 and r["train_s"] > 0 for r in generated)
    assert all(np.isfinite(r["loss"]) for r in logged)


def test_a_buffer_smaller_than_a_step_is_refused_before_training(tmp_path, tiny_models, rows):
    job = generation_job(tmp_path, tiny_models, "mixed")
    small = job.training.model_copy(update={"student_generation": job.student_generation.model_copy(
        update={"replay_capacity": 4})})  # fmt: skip
    with pytest.raises(DataError, match=r"replay_capacity \(4\) is smaller than one step's rows \(8\)"):
        Trainer(
            dataclasses.replace(job, training=small), LocalHost({"all": rows}, tmp_path / "ck", torch.device("cpu"))
        ).run()
    assert not (tmp_path / "metrics.jsonl").exists() or "global_step" not in (tmp_path / "metrics.jsonl").read_text()


def test_killed_mixed_run_resumes_with_its_buffer_and_the_same_losses(tmp_path, tiny_models, rows):
    """Killed at the checkpoint after step 6 and resumed: the same branches, the same buffer draws and
    samples (sampling is seeded per step), so the same per-step losses as the uninterrupted run."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    cpu = torch.device("cpu")
    Trainer(generation_job(straight, tiny_models, "mixed"), LocalHost({"all": rows}, straight / "ck", cpu)).run()
    job = generation_job(killed, tiny_models, "mixed", checkpoint_every_steps=3)
    with pytest.raises(Killed):
        Trainer(job, KilledAfterCheckpoint({"all": rows}, killed / "ck", cpu, step=6)).run()
    saved = torch.load(sorted((killed / "ck").glob("checkpoint-*"))[-1] / "training_state.pt", weights_only=True)
    assert len(saved["replay"]["prompts"]) > 0
    Trainer(job, LocalHost({"all": rows}, killed / "ck", cpu)).run()
    expected, resumed = step_losses(straight), step_losses(killed)
    assert sorted(resumed) == sorted(expected) == list(range(1, 11))
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5), step


@pytest.fixture(scope="module")
def rows(demo_data) -> list[dict]:
    from srd_ray.data import load_source
    from srd_ray.spec import DataSourceSpec

    data = DataSpec(train=DataSourceSpec(path=demo_data["train"], max_rows=32), **DATA)
    return load_source(data.train, data, label="train").table.select(["example_id", "prompt", "response"]).to_pylist()


def test_generation_actors_get_weights_in_their_own_dtype():
    """Review F6: actors on GPUs sample in half precision and get half-precision weights (2 bytes a weight
    over the object store instead of 4); on CPUs the student's own dtype. Integer buffers stay as they are."""
    from srd_ray.distill.student_generation import generation_dtype

    weights = {"w": torch.randn(4, 4), "position_ids": torch.arange(4)}
    packed = PackedWeights.of(weights, torch.bfloat16)
    back = packed.tensors()
    assert back["w"].dtype == torch.bfloat16 and torch.equal(back["w"], weights["w"].to(torch.bfloat16))
    assert back["position_ids"].dtype == torch.int64 and packed.arrays["w"].nbytes == 4 * 4 * 2
    assert generation_dtype(0, "float32") == "float32"  # on GPUs: bfloat16 or float16 (the GPU check)


def test_rows_for_gives_the_teacher_the_sampled_tokens_after_its_own_prompt():
    """#30: a teacher that renders a chat row its own way scores the student's samples after its prompt,
    fresh or drawn from the buffer."""
    sampler = RecordingSampler()
    settings = StudentGenerationSpec(mode="mixed", mixed_alpha=1.0, replay_capacity=2)
    generation = StudentGeneration(StepSourcePolicy(settings, 0), ReplayBuffer(2), sampler, 1, total_steps=4)
    prompts, teacher_prompts = [[1, 2], [3, 4, 5]], [[9, 1, 2], [9, 9, 3, 4, 5]]
    for step in range(3):
        rows, teacher_rows = generation.rows_for(generation.choose(step), step, prompts, "model", teacher_prompts)
        for row, teacher_row in zip(rows, teacher_rows, strict=True):
            sampled = [label for label in row.labels if label != IGNORE_INDEX]
            assert [label for label in teacher_row.labels if label != IGNORE_INDEX] == sampled
            assert teacher_row.input_ids[: -len(sampled)] in teacher_prompts
            assert teacher_prompts.index(teacher_row.input_ids[: -len(sampled)]) == prompts.index(
                row.input_ids[: -len(sampled)]
            )
