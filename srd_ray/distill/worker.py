"""What every training worker runs: set up, then train the curriculum stage by stage.

``Trainer`` reads top-down like torchtune's recipes: ``setup`` (models, data, state), ``run_stage``,
``save_checkpoint``. It talks to its surroundings through a small ``Host``: ``RayTrainHost`` inside a Ray
Train worker, ``LocalHost`` under plain ``torch.distributed`` (tests, the GPU check). Per step the trainer
picks the rows (``batches``), and ``step.train_step`` does the rest.

Every worker follows the same schedule and takes the same number of steps (all workers know every row's
length and plan identically; each reads only the rows of its own micro-batches, as it builds them: see
``pool``): Ray Train's ``report``, DDP's all-reduce and FSDP's gathers are barriers.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import torch
from torch import nn

from srd_ray import storage
from srd_ray.devices import uses_cuda
from srd_ray.distill.batches import BatchLayout, MicroBatch, StepPlan, deal_step, epoch_seed, plan_epoch, stage_steps
from srd_ray.distill.checkpointer import Checkpointer
from srd_ray.distill.losses import LossSettings, StageWeights, mix
from srd_ray.distill.metrics_log import MetricsLog
from srd_ray.distill.model_factory import ModelFactory
from srd_ray.distill.parallel import all_reduce_sum, gather_objects, resolve_precision, setup_device_math
from srd_ray.distill.pool import SIGNAL_DATASET, ExamplePool, Pool, RowPool
from srd_ray.distill.rows import local_files, write_rows
from srd_ray.distill.state import TrainState, restore_rng
from srd_ray.distill.step import StepResult, StepSettings, heldout_kd, train_step
from srd_ray.distill.strategy import strategy_for
from srd_ray.distill.student_generation import (
    ReplayBuffer,
    Source,
    StepSourcePolicy,
    StudentGeneration,
    build_sampler,
    prompt_ids,
)
from srd_ray.errors import DataError
from srd_ray.models import load_tokenizer
from srd_ray.shards import ROW_GROUP_ROWS
from srd_ray.signals import tail_temperatures
from srd_ray.spec import DataSpec, ModelSpec, StageSpec, StudentGenerationSpec, TrainingSpec, VllmSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagePlan:
    """What one curriculum stage trains on, and how."""

    index: int
    datasets: tuple[str, ...]
    settings: StageSpec


@dataclass(frozen=True)
class TrainingJob:
    """Everything a worker needs; pickled into each Ray Train worker as it is."""

    name: str
    training: TrainingSpec
    data: DataSpec
    student: ModelSpec
    teacher: ModelSpec | None
    plan: tuple[StagePlan, ...]
    loss: LossSettings
    seed: int
    metrics_path: str
    reset_optimizer_each_stage: bool = True
    teacher_dtype: str = "auto"  # auto: bfloat16 on GPU, the spec's dtype on CPU
    # online: the teacher model runs in every step. topk: the teacher_signal dataset replaces it.
    teacher_signal: str = "online"
    run_name: str = "srd"  # the MLflow experiment, when metrics go there
    heldout: tuple[tuple[str, str, str], ...] = ()  # (example_id, prompt, response) for the held-out KD metric
    generation_engine: str = "transformers"  # student_generation's engine, resolved by the driver
    vllm: VllmSpec = field(default_factory=VllmSpec)
    # Train through this stage, then stop (rank.refresh trains one stage per job; later stages' rows do not
    # exist yet). Their planned row counts, by dataset, stand in for them where all stages are planned.
    last_stage: int | None = None
    planned_rows: tuple[tuple[str, int], ...] = ()
    # Where each dataset's rows are (a Parquet file per dataset, see ``rows``) and the teacher signal's
    # shards: read by each worker as it trains (RayTrainHost; LocalHost is given its rows directly).
    row_files: tuple[tuple[str, str], ...] = ()
    signal_files: str | None = None

    @property
    def student_generation(self) -> StudentGenerationSpec:
        return getattr(self.training, "student_generation", None) or StudentGenerationSpec()

    @property
    def uses_teacher_model(self) -> bool:
        return self.teacher is not None and self.teacher_signal == "online"

    @property
    def tail_temperatures(self) -> tuple[float, ...]:
        """The temperatures the teacher pass stored tempered tails for (the same stages made them)."""
        return tail_temperatures(stage.settings for stage in self.plan)

    @property
    def stages_to_run(self) -> int:
        """The stage count after which this job is done."""
        return len(self.plan) if self.last_stage is None else self.last_stage + 1


class Host(Protocol):
    """A worker's surroundings: who it is, where its rows come from, where checkpoints go."""

    rank: int
    world: int
    device: torch.device
    node: str  # where this worker runs (a Ray node id)

    def files(self, dataset: str) -> list[Path]:
        """Local paths of a dataset's Parquet files: training rows (``rows``), or the teacher signal."""

    def checkpoint(self) -> contextlib.AbstractContextManager[Path | None]: ...

    def report(self, metrics: dict[str, Any], folder: Path | None) -> None: ...


@dataclass
class Window:
    """Steps since the last log line: throughput and padding."""

    started: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    positions: int = 0
    padding: int = 0

    sources: dict[str, int] = field(default_factory=dict)  # steps per source (student generation only)

    def add(self, plan: StepPlan, source: Source = Source.REFERENCE) -> None:
        self.sources[source.value] = self.sources.get(source.value, 0) + 1
        self.tokens += plan.num_items
        self.positions += plan.positions
        self.padding += plan.padding


class Trainer:
    def __init__(self, job: TrainingJob, host: Host) -> None:
        self.job, self.host, self.training = job, host, job.training
        self.device = host.device
        self.precision = resolve_precision(self.training.precision, self.device)
        self.strategy = strategy_for(self.training.strategy, self.device, host.rank, host.world, self.precision)
        self.layout = BatchLayout(
            self.training.batch_size, self.training.gradient_accumulation_steps, host.world,
            self.training.group_by_length,
        )  # fmt: skip
        self.tokenizer = load_tokenizer(job.student)
        self.latest_metrics: dict[str, float] = {}  # rides along with each checkpoint report
        self.generation: StudentGeneration | None = None

    # ----------------------------------------------------------------------------------------------------
    # Setup

    def setup(self) -> None:
        setup_device_math(self.device)
        job = self.job
        self.metrics = MetricsLog(job.metrics_path, self.host.rank, self.training.metrics, job.name, job.run_name)
        self.checkpointer = Checkpointer(job, self.host, self.strategy, self.tokenizer, self.device)
        with self.host.checkpoint() as folder:
            self.state = TrainState.load(folder) if folder else TrainState()
            self.model = self.build_model(folder)
        nodes = gather_objects(self.host.node)  # where each rank runs: a restart may move them
        self._append_metrics({"event": "workers", "nodes": nodes})
        if self.state.rng:
            self._check_same_workers()
            restore_rng(self.state.rng[self.host.rank], self.device)
            at = {"stage": self.state.stage, "stage_step": self.state.stage_step, "global_step": self.state.global_step}
            self._append_metrics({"event": "resumed", **at})
        else:
            torch.manual_seed(self.job.seed + self.host.rank)
        # A teacher model that runs in the step reads chat rows in its own chat template.
        teacher_tokenizer = load_tokenizer(self.job.teacher) if self.job.uses_teacher_model else None
        self.rows = RowPool(self.host, self.tokenizer, self.job.data, self.job.teacher_signal == "topk",
                            self.job.tail_temperatures, teacher_tokenizer)  # fmt: skip
        self.scaler = self.precision.grad_scaler(self.device)
        self.optimizer = self.scheduler = None
        generating = self.job.student_generation.mode != "off"
        if generating or not self.job.reset_optimizer_each_stage:  # these plan over every stage's steps
            total_steps = self._planned_steps()
        if not self.job.reset_optimizer_each_stage:
            self._new_optimizer(self.job.plan[0].settings.lr, total_steps)
        if generating:
            self.generation = self._student_generation(total_steps)
        self.heldout = self._heldout_batches()
        if self.state.global_step == 0 and self.state.stage == 0:
            self._record_heldout(after_stage=-1)

    def _student_generation(self, total_steps: int) -> StudentGeneration:
        settings, job = self.job.student_generation, self.job
        if settings.mode in ("mixed", "adaptive") and settings.replay_capacity < self.layout.rows_per_step:
            raise DataError(
                f"distill.student_generation.replay_capacity ({settings.replay_capacity}) is smaller than one "
                f"step's rows ({self.layout.rows_per_step}): a step could not be drawn from the buffer"
            )
        sampler = build_sampler(
            settings, job.generation_engine, job.student, job.data, job.vllm, tokenizer=self.tokenizer,
            rank=self.host.rank, world=self.host.world, strategy=self.strategy,
        )  # fmt: skip
        buffer = ReplayBuffer.from_state(self.state.replay, settings.replay_capacity)
        policy = StepSourcePolicy(settings, self.job.seed)
        return StudentGeneration(policy, buffer, sampler, settings.sync_every_steps, total_steps)

    def build_model(self, checkpoint: Path | None) -> nn.Module:
        """Student (from the spec or the checkpoint) and frozen teacher, spread over workers by the strategy."""
        factory = ModelFactory(self.job, self.tokenizer, self.device, checkpoint, self.host.rank)
        return self.strategy.build(factory)

    def _check_same_workers(self) -> None:
        """A checkpoint resumes only on as many workers as wrote it: the step plan and every worker's RNG
        stream depend on the count (review C8)."""
        if len(self.state.rng) != self.host.world:
            raise DataError(
                f"{self.job.name}: the checkpoint was written by {len(self.state.rng)} worker(s), this run has "
                f"{self.host.world} ({self.job.name}.num_workers): resume with the same number, or rerun with "
                f"--redo {self.job.name}"
            )

    def _pool(self, stage: StagePlan) -> Pool:
        """The stage's rows: each dataset opened once, when its first stage starts."""
        return self.rows.stage(stage.datasets)

    def _planned_steps(self) -> int:
        """Every stage's optimizer steps; a stage whose rows are not known yet counts its planned rows."""
        planned = dict(self.job.planned_rows)
        total = 0
        for stage in self.job.plan:
            if all(name in planned for name in stage.datasets):
                total += stage_steps(sum(planned[name] for name in stage.datasets), stage.settings, self.layout)
            else:
                total += self._stage_steps(stage, self._pool(stage))
        return total

    def _stage_steps(self, stage: StagePlan, pool: Pool) -> int:
        steps = stage_steps(len(pool), stage.settings, self.layout)
        if steps == 0:
            raise DataError(f"stage {stage.index} has {len(pool)} training rows: too few for {self.host.world} workers")
        return steps

    def _heldout_batches(self) -> list[MicroBatch]:
        if self.job.teacher is None or not self.job.heldout:
            return []
        return self.rows.heldout_batches(self.job.heldout, self.training.batch_size)

    def _new_optimizer(self, lr: float, total_steps: int) -> None:
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=self.training.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, T_max=total_steps, eta_min=self.training.min_lr
        )

    def _restore_optimizer(self) -> None:
        """After a resume: the checkpoint's optimizer and schedule, unless it was taken at the end of a stage
        and every stage starts a fresh optimizer (the release's default)."""
        optimizer, scheduler, scaler = self.state.release_optimizer()
        if scaler:
            self.scaler.load_state_dict(scaler)
        if optimizer is not None and (self.state.stage_step > 0 or not self.job.reset_optimizer_each_stage):
            self.strategy.load_optimizer_state(self.model, self.optimizer, optimizer)
            self.scheduler.load_state_dict(scheduler)

    # ----------------------------------------------------------------------------------------------------
    # Training

    def run(self) -> None:
        self.setup()
        try:
            for stage in self.job.plan[self.state.stage : self.job.stages_to_run]:
                self.run_stage(stage)
        finally:
            self.metrics.close()
            if self.generation is not None:
                self.generation.sampler.close()

    def run_stage(self, stage: StagePlan) -> None:
        pool = self._pool(stage)
        total = self._stage_steps(stage, pool)
        steps_per_epoch = self.layout.steps_per_epoch(len(pool))
        if self.job.reset_optimizer_each_stage:
            self._new_optimizer(stage.settings.lr, total)
        self._restore_optimizer()
        first_step = self.state.stage_step
        settings = StepSettings(
            StageWeights(stage.settings.kd_weight, stage.settings.temperature), self.job.loss,
            self.training.loss_chunk_tokens, self.training.max_grad_norm, self.host.world,
        )  # fmt: skip
        self._log_stage_start(stage, pool, total, steps_per_epoch)
        window, stage_window, plans = Window(), Window(), None
        for stage_step in range(first_step, total):
            epoch, within = divmod(stage_step, steps_per_epoch)
            if plans is None or within == 0:
                seed = epoch_seed(self.job.seed, stage.index, epoch)
                plans = plan_epoch(pool.lengths, pool.scored_tokens, self.layout, seed)
            step_pool, plan, source = self._step_rows(pool, plans[within])
            result = self._step(step_pool, plan, settings)
            self.state.stage_step, self.state.global_step = stage_step + 1, self.state.global_step + 1
            self.state.tokens_seen += plan.num_items
            window.add(plan, source)
            stage_window.add(plan, source)
            # Every log_every_steps, and the last step of each stage: a short stage still reports its losses.
            if self.state.global_step % self.training.log_every_steps == 0 or stage_step + 1 == total:
                self._log_step(stage, epoch, result, plan, window)
                window = Window()
            every = self.training.checkpoint_every_steps
            if every and self.state.global_step % every == 0 and stage_step + 1 < total:
                self.save_checkpoint()
        self._append_metrics({"event": "stage_end", "stage": stage.index,
                              "padding_fraction": stage_window.padding / max(stage_window.positions, 1)})  # fmt: skip
        self._record_heldout(after_stage=stage.index)
        self.state.stage, self.state.stage_step = stage.index + 1, 0
        self.save_checkpoint(final=stage.index + 1 == self.job.stages_to_run)

    def _step_rows(self, pool: Pool, plan: StepPlan) -> tuple[Pool, StepPlan, Source]:
        """The step's rows: the planned references, or (student generation) the student's samples of the
        planned rows' prompts or a draw from the replay buffer, dealt to workers like planned rows."""
        if self.generation is None:
            return pool, plan, Source.REFERENCE
        source = self.generation.choose(self.state.global_step)
        if source.train_on is Source.REFERENCE:
            return pool, plan, source.train_on
        planned = [i for micro in plan.groups for part in micro for i in part]
        texts = pool.texts(planned)
        examples = [self.rows.encode(*text) for text in texts]
        teacher_rows = self.rows.teacher_examples(texts, examples)  # None unless the teacher renders its own
        prompts = [prompt_ids(example) for example in examples]
        teacher_prompts = None if teacher_rows is None else [prompt_ids(example) for example in teacher_rows]
        generated = ExamplePool(*self.generation.rows_for(source, self.state.global_step, prompts, self.model,
                                                          teacher_prompts))  # fmt: skip
        return generated, deal_step(list(range(len(generated))), generated.lengths, generated.scored_tokens,
                                    self.layout), source.train_on  # fmt: skip

    def _step(self, pool: Pool, plan: StepPlan, settings: StepSettings) -> StepResult:
        pad = self.tokenizer.pad_token_id
        batches = [pool.micro_batch(rows, pad) for rows in plan.micro_batches(self.host.rank)]
        return train_step(
            self.model, batches, plan.num_items, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.scaler, settings=settings, precision=self.precision, device=self.device,
        )  # fmt: skip

    # ----------------------------------------------------------------------------------------------------
    # Metrics and checkpoints

    def _log_step(self, stage: StagePlan, epoch: int, result: StepResult, plan: StepPlan, window: Window) -> None:
        """Reads the step's sums back (the only host sync of a step, and only at log steps)."""
        sums = all_reduce_sum(torch.stack([result.ce_sum, result.kd_sum]).float())
        ce, kd = (sums / max(plan.num_items, 1)).tolist()
        kd_weight = stage.settings.kd_weight
        elapsed = time.perf_counter() - window.started
        metrics = {
            "stage": stage.index, "epoch": epoch, "global_step": self.state.global_step,
            "ce": ce, "kd": kd, "loss": mix(ce, kd, kd_weight),
            "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(result.grad_norm),
            "tokens_seen": self.state.tokens_seen, "tokens_per_s": window.tokens / max(elapsed, 1e-9),
            "padding_fraction": window.padding / max(window.positions, 1),
        }  # fmt: skip
        if self.generation is not None:
            metrics.update(self.generation.times.take(elapsed), sources=window.sources)
        self.latest_metrics = {k: metrics[k] for k in ("loss", "ce", "kd", "lr", "tokens_per_s")}
        self._append_metrics(metrics)
        if self.training.report_every_log_step:
            self.host.report(metrics, None)  # every rank, every log step: report is a barrier

    def _append_metrics(self, metrics: dict[str, Any]) -> None:
        self.metrics.append(metrics, self.state.global_step)

    def _log_stage_start(self, stage: StagePlan, pool: Pool, total: int, per_epoch: int) -> None:
        if self.host.rank == 0:
            log.info(
                "stage %d: %d rows from %s over %d worker(s) (%s, %s on %s), %d steps (%d per epoch), "
                "kd_weight %.2f, T %.2f",
                stage.index, len(pool), ",".join(stage.datasets), self.host.world,
                self.training.strategy, self.precision.name, self.device, total, per_epoch,
                stage.settings.kd_weight, stage.settings.temperature,
            )  # fmt: skip

    def _record_heldout(self, after_stage: int) -> None:
        if not self.heldout:
            return
        with self.strategy.evaluation(self.model):
            value = heldout_kd(
                self.model, self.heldout, loss=self.job.loss, chunk_tokens=self.training.loss_chunk_tokens,
                precision=self.precision, device=self.device,
            )  # fmt: skip
        # Labelled with the teacher it was measured against: the model (exact) or the stored top-k signal.
        self._append_metrics({"event": "heldout", "after_stage": after_stage, "heldout_kd": value,
                              "teacher_signal": self.job.teacher_signal})  # fmt: skip

    def save_checkpoint(self, final: bool = False) -> None:
        """Report a checkpoint that resumes at ``self.state``'s position (collective: see ``checkpointer``)."""
        self.metrics.publish()  # rank 0's sinks, if any
        self.checkpointer.save(self.model, self.state, self, self.latest_metrics, final)


# --------------------------------------------------------------------------------------------------------
# Hosts


class RayTrainHost:
    """Inside a Ray Train worker: rank and device from Ray Train, rows from the files the driver wrote
    (``TrainingJob.row_files``, the teacher signal's shards; a run on an object store is downloaded once per
    node), checkpoints reported to Ray Train."""

    def __init__(self, job: TrainingJob) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        use_gpu = job.training.use_gpu
        self.device = ray.train.torch.get_device() if uses_cuda(1 if use_gpu else 0) else torch.device("cpu")
        self.node = ray.get_runtime_context().get_node_id()
        self.places = {**dict(job.row_files), **({SIGNAL_DATASET: job.signal_files} if job.signal_files else {})}

    def files(self, dataset: str) -> list[Path]:
        return local_files(self.places[dataset])

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        # A local checkpoint is used in place; a remote one is downloaded and removed after the block.
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def report(self, metrics: dict[str, Any], folder: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder else None
        ray.train.report(metrics, checkpoint=checkpoint)


class LocalHost:
    """Plain ``torch.distributed`` (or one process): rows given up front (written to this host's own
    folder in the layout the driver writes, so training reads them as it would on Ray), checkpoints kept
    in a folder (the newest ``keep``). For tests and for the GPU check, which has no Ray."""

    def __init__(
        self, datasets: dict[str, pa.Table | list[dict]], checkpoints: Path, device: torch.device, keep: int = 2
    ) -> None:
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        self.node = socket.gethostname()
        self.rank = dist.get_rank() if distributed else 0
        self.world = dist.get_world_size() if distributed else 1
        self.device, self.folder, self.keep = device, checkpoints, keep
        self.datasets = {name: rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
                         for name, rows in datasets.items()}  # fmt: skip
        self.rows_dir = Path(tempfile.mkdtemp(prefix="srd-rows-"))
        self.reports: list[dict[str, Any]] = []

    def files(self, dataset: str) -> list[Path]:
        path = self.rows_dir / f"{dataset}.parquet"
        if not path.exists():
            table = self.datasets[dataset]
            if dataset == SIGNAL_DATASET:
                storage.write_parquet(path, table, row_group_size=ROW_GROUP_ROWS)
            else:
                write_rows(table, path)
        return [path]

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[Path | None]:
        saved = sorted(self.folder.glob("checkpoint-*")) if self.folder.exists() else []
        yield saved[-1] if saved else None

    def report(self, metrics: dict[str, Any], folder: Path | None) -> None:
        self.reports.append(metrics)
        if folder is None or self.rank != 0:
            return
        target = self.folder / f"checkpoint-{metrics['global_step']:08d}"
        with storage.directory(target) as scratch:  # appears whole: never a partial "newest" checkpoint
            shutil.copytree(folder, scratch, dirs_exist_ok=True)
        for old in sorted(self.folder.glob("checkpoint-*"))[: -self.keep]:
            shutil.rmtree(old)


def train_loop_per_worker(config: dict[str, TrainingJob]) -> None:
    """Ray Train's entry point on every worker."""
    job = config["job"]
    Trainer(job, RayTrainHost(job)).run()
