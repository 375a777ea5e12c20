"""Student-generated responses during distillation: GKD's on-policy and mixed modes and DistiLLM's adaptive
mode, on the SRD curriculum's prompts.

Per optimizer step, ``StepSourcePolicy`` picks what the step trains on: the references (as off-policy KD),
fresh samples of the current student, or a batch drawn from the ``ReplayBuffer`` of earlier samples. The
draw comes from (seed, global step) alone, so every worker takes the same branch at every step and a
resumed run takes the branches the uninterrupted one would have.

Samples come from a ``Sampler``:

- ``ActorSampler`` (engine vllm): a pool of Ray actors, each holding an inference engine (the same
  :mod:`srd_ray.engines` that reflection and evaluation use) with a copy of the student (in half precision
  on GPUs, one GPU each: ``tensor_parallel_size`` 1). Every ``sync_every_steps`` optimizer steps the
  trained weights are gathered to worker 0 (FSDP shards included), cast to the actors' dtype, put into the
  object store once as NumPy arrays (``PackedWeights``: every actor maps them without a copy), and loaded
  by every actor through the engine's own weight loader. Worker 0 sends a step's prompts in one call per
  actor and shares the samples with the other workers.
- ``InWorkerSampler`` (engine transformers): each worker samples its share of the step's prompts with
  ``generate`` on the model it trains (the SRD release's way), through the strategy's generation context
  (under FSDP a forward through the student's root); the workers then exchange their samples.

Both draw each row with its own seed (from the step's seed and the row's place in the step), so a step's
samples do not depend on how many workers share it.

A generated row is the prompt's training tokens followed by the sampled tokens, which are also its labels:
the CE and the KD terms are both computed on the student's own samples.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from srd_ray import auto
from srd_ray.devices import uses_cuda
from srd_ray.distill.batches import BatchLayout, StepPlan, deal_step
from srd_ray.distill.parallel import broadcast_object, gather_objects
from srd_ray.distill.pool import ExamplePool, Pool, RowPool
from srd_ray.errors import DataError
from srd_ray.models import DTYPES, IGNORE_INDEX, TrainingExample
from srd_ray.spec import DataSpec, GenerationSpec, ModelSpec, StudentGenerationSpec, VllmSpec


class Source(Enum):
    """What one optimizer step trains on."""

    REFERENCE = "reference"  # the pool's reference responses
    SAMPLES = "samples"  # the current student's samples of the step's prompts
    BUFFER = "buffer"  # a batch drawn from the replay buffer


@dataclass(frozen=True)
class StepSource:
    train_on: Source
    generate: bool = False  # sample the step's prompts first
    push: bool = False  # and add the samples to the replay buffer


REFERENCE = StepSource(Source.REFERENCE)


def step_uniform(seed: int, global_step: int) -> float:
    """The step's draw r ~ U(0, 1): a function of (seed, step) only, the same on every worker."""
    return float(np.random.default_rng([seed, global_step, 0x5EED]).random())


@dataclass(frozen=True)
class StepSourcePolicy:
    """Which source each step trains on, per ``student_generation.mode`` (see the spec section)."""

    settings: StudentGenerationSpec
    seed: int

    def threshold(self, step: int, total_steps: int) -> float:
        """DistiLLM's adaptive threshold after ``step`` of ``total_steps`` optimizer steps."""
        init, progress = self.settings.init_threshold, step / max(total_steps, 1)
        if self.settings.replay_ratio == "constant":
            return 0.5 * init
        if self.settings.replay_ratio == "increasing":
            return init * progress
        return init * (1 - progress)

    def choose(self, step: int, total_steps: int, buffer_full: bool) -> StepSource:
        return self.choose_for_draw(step_uniform(self.seed, step), step, total_steps, buffer_full)

    def choose_for_draw(self, r: float, step: int, total_steps: int, buffer_full: bool) -> StepSource:
        settings = self.settings
        if settings.mode == "on":
            return StepSource(Source.SAMPLES, generate=True)
        if settings.mode == "mixed":
            return StepSource(Source.BUFFER, generate=True, push=True) if r < settings.mixed_alpha else REFERENCE
        if settings.mode == "adaptive":
            init = settings.init_threshold
            if r < self.threshold(step, total_steps) or (r < init and not buffer_full):
                return StepSource(Source.SAMPLES, generate=True, push=True)
            return StepSource(Source.BUFFER) if r < init else REFERENCE
        return REFERENCE


@dataclass
class ReplayBuffer:
    """The newest ``capacity`` generated rows, as (prompt ids, sampled ids, and the teacher's prompt ids
    where the teacher renders the row its own way, else None); drawn from without replacement with a
    (seed, step) generator, so every worker draws the same rows."""

    capacity: int
    prompts: list[list[int]] = field(default_factory=list)
    responses: list[list[int]] = field(default_factory=list)
    teacher_prompts: list[list[int] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def full(self) -> bool:
        return len(self) >= self.capacity

    def push(
        self, prompts: list[list[int]], responses: list[list[int]], teacher_prompts: list[list[int]] | None = None
    ) -> None:
        self.prompts += prompts
        self.responses += responses
        self.teacher_prompts += teacher_prompts or [None] * len(prompts)
        overflow = len(self) - self.capacity
        if overflow > 0:  # first in, first out
            del self.prompts[:overflow], self.responses[:overflow], self.teacher_prompts[:overflow]

    def draw(self, rows: int, seed: int, step: int) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        """(prompts, responses, teacher prompts) of ``rows`` rows; a row the teacher renders as the student
        does has the student's prompt as the teacher's."""
        if rows > len(self):
            raise ValueError(f"the replay buffer holds {len(self)} rows; a step needs {rows}")
        chosen = np.random.default_rng([seed, step, 0xB0FF]).choice(len(self), size=rows, replace=False)
        prompts = [self.prompts[i] for i in chosen]
        teacher = [self.teacher_prompts[i] or prompt for i, prompt in zip(chosen, prompts, strict=True)]
        return prompts, [self.responses[i] for i in chosen], teacher

    def state(self) -> dict[str, Any]:
        """Plain lists: a checkpoint's training state loads with ``weights_only=True``."""
        return {"prompts": self.prompts, "responses": self.responses, "teacher_prompts": self.teacher_prompts}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, capacity: int) -> ReplayBuffer:
        if not state:
            return cls(capacity)
        prompts = list(state["prompts"])
        teacher = list(state.get("teacher_prompts") or [None] * len(prompts))  # checkpoints before it had none
        buffer = cls(capacity, prompts, list(state["responses"]), teacher)
        buffer.push([], [])  # a smaller capacity than the checkpoint's keeps the newest rows
        return buffer


def prompt_ids(example: TrainingExample) -> list[int]:
    """A training row's prompt tokens: those before its last run of labels (a chat row's earlier assistant
    turns are labelled too, and belong to the prompt the student answers)."""
    labels = example.labels
    start = max(t for t, label in enumerate(labels) if label != IGNORE_INDEX)
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return example.input_ids[:start]


def generated_example(prompt: list[int], sampled: list[int]) -> TrainingExample:
    """A row whose response (and labels) are the sampled tokens."""
    if not sampled:
        raise ValueError("a sample has no tokens")
    return TrainingExample(prompt + sampled, [IGNORE_INDEX] * len(prompt) + sampled, prompt_truncated=False)


def sampling_settings(settings: StudentGenerationSpec, data: DataSpec) -> GenerationSpec:
    """The samples' settings: the issue's (and GKD's) plain sampling, up to a reference's length."""
    return GenerationSpec(
        temperature=settings.generation_temperature, top_k=0, top_p=1.0, no_repeat_ngram_size=0,
        max_new_tokens=data.max_response_tokens,
    )  # fmt: skip


def sample_seeds(seed: int, rows: int) -> list[int]:
    """One vLLM sampling seed per row, from the step's seed."""
    return np.random.default_rng([seed, 0x5A3]).integers(0, 2**31 - 1, size=rows).tolist()


# --------------------------------------------------------------------------------------------------------
# Samplers


class Sampler(Protocol):
    def sync(self, model: nn.Module) -> None:
        """Bring the generator to the trained weights (collective: every worker calls it)."""

    def sample(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        """Sampled ids for every prompt of the step (collective; every worker gets all of them)."""

    def close(self) -> None: ...


@dataclass
class GenerationTimes:
    """Seconds spent generating and syncing since the last log line."""

    generate_s: float = 0.0
    sync_s: float = 0.0

    def take(self, elapsed_s: float) -> dict[str, float]:
        """The window's split of ``elapsed_s`` into generating, syncing and training; starts a new window."""
        split = {"generate_s": self.generate_s, "sync_s": self.sync_s,
                 "train_s": max(elapsed_s - self.generate_s - self.sync_s, 0.0)}  # fmt: skip
        self.generate_s = self.sync_s = 0.0
        return split


class InWorkerSampler:
    """Each worker samples its contiguous share of the prompts with the model it trains."""

    def __init__(self, settings: GenerationSpec, tokenizer: Any, rank: int, world: int, strategy: Any) -> None:
        self.settings, self.tokenizer = settings, tokenizer
        self.rank, self.world, self.strategy = rank, world, strategy
        self.model: nn.Module | None = None

    def sync(self, model: nn.Module) -> None:
        self.model = model  # the live model: nothing to copy

    def sample(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        from srd_ray.engines import generate_tokens

        seeds = sample_seeds(seed, len(prompts))
        share = np.array_split(np.arange(len(prompts)), self.world)[self.rank].tolist()
        with self.strategy.generation(self.model) as generator, torch.no_grad():
            mine = generate_tokens(
                generator, [prompts[i] for i in share], self.settings, seed, self.tokenizer,
                synced_gpus=self.strategy.synced_gpus, row_seeds=[seeds[i] for i in share],
            ) if share else []  # fmt: skip
        return [ids for part in gather_objects(mine) for ids in part]

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class PackedWeights:
    """A state dict as NumPy arrays. Ray stores NumPy arrays out of band and every reader maps them from
    the object store without a copy; torch tensors would be pickled whole, one more serialisation and copy
    per reader (``bench/on_policy.py --parts sync`` measures both). bfloat16, which NumPy lacks, travels
    as its int16 bits."""

    arrays: dict[str, np.ndarray]
    dtypes: dict[str, torch.dtype]

    @classmethod
    def of(cls, weights: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> PackedWeights:
        """``weights``, floating-point ones cast to ``dtype`` first (the receiving engine's)."""
        if dtype is not None:
            weights = {name: t.to(dtype) if t.is_floating_point() else t for name, t in weights.items()}
        as_bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16}
        arrays = {
            name: tensor.contiguous().view(as_bits.get(tensor.dtype, tensor.dtype)).numpy()
            for name, tensor in weights.items()
        }
        return cls(arrays, {name: tensor.dtype for name, tensor in weights.items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors over the same (read-only) memory: the engines' loaders copy them into their own."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return {name: torch.from_numpy(array).view(self.dtypes[name]) for name, array in self.arrays.items()}


def generation_dtype(num_gpus: float, trained: str) -> str:
    """The dtype generation actors sample in: a frozen copy's (``srd_ray.auto``) on GPUs, the student's own
    dtype on CPUs."""
    if not uses_cuda(num_gpus):
        return trained
    return auto.frozen_weights_dtype("auto", *auto.device_facts("cuda"))


class GenerationActor:
    """A Ray actor holding one inference engine loaded with the student."""

    def __init__(self, engine: str, model: ModelSpec, data: DataSpec, settings: StudentGenerationSpec,
                 vllm: VllmSpec) -> None:  # fmt: skip
        from srd_ray.engines import build_engine

        self.dtype = generation_dtype(settings.num_gpus_per_actor, model.dtype)
        # One GPU per actor: vLLM's weight reload takes an iterator, which cannot reach other processes.
        self.engine = build_engine(
            engine, model.model_copy(update={"dtype": self.dtype}), data, settings,
            max_new_tokens=data.max_response_tokens, vllm=vllm.model_copy(update={"tensor_parallel_size": 1}),
            max_logprobs=0,
        )  # fmt: skip

    def weights_dtype(self) -> str:
        return self.dtype

    def load_weights(self, weights: PackedWeights) -> float:
        """Load ``weights``; returns the engine's own loading time (the rest of the call is transport)."""
        started = time.perf_counter()
        self.engine.load_weights(weights.tensors())
        return time.perf_counter() - started

    def sample_tokens(self, prompts: list[list[int]], settings: GenerationSpec, seeds: list[int]) -> list[list[int]]:
        return self.engine.sample_tokens(prompts, settings, seeds)

    def sequence_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        return self.engine.sequence_logprobs(token_ids)


class ActorSampler:
    """Worker 0 drives a pool of ``GenerationActor``; the other workers receive its samples."""

    def __init__(
        self, engine: str, student: ModelSpec, data: DataSpec, settings: StudentGenerationSpec, vllm: VllmSpec,
        rank: int, strategy: Any,
    ) -> None:  # fmt: skip
        self.rank, self.actors, self.strategy, self.dtype = rank, [], strategy, None
        self.sampling = sampling_settings(settings, data)
        if rank == 0:
            import ray

            # Outside the training workers' placement group: the actors bring their own resources.
            remote = ray.remote(GenerationActor).options(
                num_cpus=settings.num_cpus_per_actor,
                num_gpus=settings.num_gpus_per_actor,
                scheduling_strategy="DEFAULT",
            )
            self.actors = [remote.remote(engine, student, data, settings, vllm) for _ in range(settings.concurrency)]

    def sync(self, model: nn.Module) -> None:
        weights = self.strategy.student_state_dict(model)  # collective under FSDP; rank 0 gets them
        if self.rank == 0:
            import ray

            if self.dtype is None:
                self.dtype = ray.get(self.actors[0].weights_dtype.remote())
            packed = PackedWeights.of(weights, DTYPES[self.dtype])
            reference = ray.put(packed)  # one copy in the object store, read by every actor
            ray.get([actor.load_weights.remote(reference) for actor in self.actors])
        broadcast_object(None)  # the others wait until the actors hold the new weights

    def sample(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        samples = None
        if self.rank == 0:
            import ray

            seeds = sample_seeds(seed, len(prompts))
            parts = np.array_split(np.arange(len(prompts)), len(self.actors))
            calls = [
                actor.sample_tokens.remote([prompts[i] for i in part], self.sampling, [seeds[i] for i in part])
                for actor, part in zip(self.actors, parts, strict=True)
                if len(part)
            ]
            samples = [ids for result in ray.get(calls) for ids in result]
        return broadcast_object(samples)

    def close(self) -> None:
        if self.actors:
            import ray

            for actor in self.actors:
                ray.kill(actor)
            self.actors = []


def build_sampler(
    settings: StudentGenerationSpec, engine: str, student: ModelSpec, data: DataSpec, vllm: VllmSpec, *,
    tokenizer: Any, rank: int, world: int, strategy: Any,
) -> Sampler:  # fmt: skip
    """``engine`` is resolved (see :func:`srd_ray.auto.engine`)."""
    if engine == "transformers":
        return InWorkerSampler(sampling_settings(settings, data), tokenizer, rank, world, strategy)
    return ActorSampler(engine, student, data, settings, vllm, rank, strategy)


@dataclass
class StudentGeneration:
    """A trainer's on-policy machinery: the policy, the buffer, the sampler, and the time they take."""

    policy: StepSourcePolicy
    buffer: ReplayBuffer
    sampler: Sampler
    sync_every_steps: int
    total_steps: int  # over all stages: the adaptive threshold's schedule
    times: GenerationTimes = field(default_factory=GenerationTimes)
    synced_at: int | None = None  # the global step whose weights the sampler holds

    def choose(self, step: int) -> StepSource:
        return self.policy.choose(step, self.total_steps, self.buffer.full)

    def rows_for(
        self,
        source: StepSource,
        step: int,
        prompts: list[list[int]],
        model: nn.Module,
        teacher_prompts: list[list[int]] | None = None,
    ) -> tuple[list[TrainingExample], list[TrainingExample] | None]:
        """The step's training rows for a generated or replayed source, and the teacher's rendering of them
        where it renders rows its own way (``prompts``, ``teacher_prompts``: the step's rows' prompts, in
        plan order). The teacher scores the same sampled tokens after its own prompt."""
        if source.generate:
            if self.synced_at is None or step - self.synced_at >= self.sync_every_steps:
                started = time.perf_counter()
                self.sampler.sync(model)
                self.synced_at = step
                self.times.sync_s += time.perf_counter() - started
            started = time.perf_counter()
            sampled = self.sampler.sample(prompts, self.policy.seed * 1_000_003 + step)
            self.times.generate_s += time.perf_counter() - started
            if source.push:
                self.buffer.push(prompts, sampled, teacher_prompts)
        if source.train_on is Source.BUFFER:
            prompts, sampled, teacher_prompts = self.buffer.draw(len(prompts), self.policy.seed, step)
            if teacher_prompts == prompts:
                teacher_prompts = None
        rows = [generated_example(p, s) for p, s in zip(prompts, sampled, strict=True)]
        if teacher_prompts is None:
            return rows, None
        return rows, [generated_example(p, s) for p, s in zip(teacher_prompts, sampled, strict=True)]

    def step_rows(
        self, pool: Pool, plan: StepPlan, rows: RowPool, layout: BatchLayout, step: int, model: nn.Module
    ) -> tuple[Pool | ExamplePool, StepPlan, Source]:
        """The step's rows: the planned references, or the student's samples of the planned rows' prompts
        or a draw from the replay buffer, dealt to workers like planned rows."""
        source = self.choose(step)
        if source.train_on is Source.REFERENCE:
            return pool, plan, source.train_on
        texts = pool.texts([i for micro in plan.groups for part in micro for i in part])
        examples = [rows.encode(*text) for text in texts]
        teacher_rows = rows.teacher_examples(texts, examples)  # None unless the teacher renders its own
        prompts = [prompt_ids(example) for example in examples]
        teacher_prompts = None if teacher_rows is None else [prompt_ids(example) for example in teacher_rows]
        generated = ExamplePool(*self.rows_for(source, step, prompts, model, teacher_prompts))
        dealt = deal_step(list(range(len(generated))), generated.lengths, generated.scored_tokens, layout)
        return generated, dealt, source.train_on


def student_generation(
    job: Any, replay: dict[str, Any] | None, rows_per_step: int, *, tokenizer: Any, rank: int, world: int,
    strategy: Any, total_steps: int,
) -> StudentGeneration:  # fmt: skip
    """A training job's on-policy machinery (``job``: a ``worker.TrainingJob``), its replay buffer restored
    from a checkpoint's ``replay`` state."""
    settings = job.student_generation
    if settings.mode in ("mixed", "adaptive") and settings.replay_capacity < rows_per_step:
        raise DataError(
            f"distill.student_generation.replay_capacity ({settings.replay_capacity}) is smaller than one "
            f"step's rows ({rows_per_step}): a step could not be drawn from the buffer"
        )
    sampler = build_sampler(settings, job.generation_engine, job.student, job.data, job.vllm, tokenizer=tokenizer,
                            rank=rank, world=world, strategy=strategy)  # fmt: skip
    buffer = ReplayBuffer.from_state(replay, settings.replay_capacity)
    return StudentGeneration(StepSourcePolicy(settings, job.seed), buffer, sampler, settings.sync_every_steps,
                             total_steps)  # fmt: skip
