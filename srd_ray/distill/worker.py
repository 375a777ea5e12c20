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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import torch
from torch import nn

from srd_ray import storage
from srd_ray.devices import uses_cuda
from srd_ray.distill.batches import BatchLayout, StepPlan, epoch_seed, plan_epoch
from srd_ray.distill.checkpointer import Checkpointer
from srd_ray.distill.curriculum import StagePlan, planned_steps, steps_of_stage
from srd_ray.distill.heldout import HeldoutProbe
from srd_ray.distill.losses import LossSettings, mix
from srd_ray.distill.metrics_log import MetricsLog, Window
from srd_ray.distill.model_factory import ModelFactory
from srd_ray.distill.optimization import Optimization
from srd_ray.distill.parallel import all_reduce_sum, gather_objects, resolve_precision, setup_device_math
from srd_ray.distill.pool import SIGNAL_DATASET, Pool, RowPool
from srd_ray.distill.rows import local_files, write_rows
from srd_ray.distill.state import TrainState, seed_or_resume_rng
from srd_ray.distill.step import StepResult, StepSettings, train_step
from srd_ray.distill.strategy import strategy_for
from srd_ray.distill.student_generation import Source, StudentGeneration, student_generation
from srd_ray.models import load_tokenizer
from srd_ray.shards import ROW_GROUP_ROWS
from srd_ray.signals import tail_temperatures
from srd_ray.spec import DataSpec, ModelSpec, StudentGenerationSpec, TrainingSpec, VllmSpec

__all__ = ["SIGNAL_DATASET", "LocalHost", "RayTrainHost", "StagePlan", "Trainer", "TrainingJob"]

log = logging.getLogger(__name__)


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


class Trainer:
    """One worker's training job: ``setup``, then ``run_stage`` for each curriculum stage, a ``step`` at a
    time, with a ``save_checkpoint`` at the end of each stage (and every ``checkpoint_every_steps``)."""

    def __init__(self, job: TrainingJob, host: Host) -> None:
        self.job, self.host, self.training = job, host, job.training
        self.device = host.device
        self.precision = resolve_precision(self.training.precision, self.device)
        self.strategy = strategy_for(self.training.strategy, self.device, host.rank, host.world, self.precision)
        self.layout = BatchLayout.of(self.training, host.world)
        self.tokenizer = load_tokenizer(job.student)
        self.optimization = Optimization(self.training, self.precision, self.device, job.reset_optimizer_each_stage)
        self.latest_metrics: dict[str, float] = {}  # rides along with each checkpoint report
        self.generation: StudentGeneration | None = None

    @property
    def scaler(self) -> torch.amp.GradScaler:
        return self.optimization.scaler

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
        self._append_metrics({"event": "workers", "nodes": gather_objects(self.host.node)})  # a restart may move them
        seed_or_resume_rng(self.state, job.seed, self.host.rank, self.host.world, self.device, job.name)
        if self.state.rng:
            at = {"stage": self.state.stage, "stage_step": self.state.stage_step, "global_step": self.state.global_step}
            self._append_metrics({"event": "resumed", **at})
        # A teacher model that runs in the step reads chat rows in its own chat template.
        teacher_tokenizer = load_tokenizer(job.teacher) if job.uses_teacher_model else None
        self.rows = RowPool(self.host, self.tokenizer, job.data, job.teacher_signal == "topk", job.tail_temperatures,
                            teacher_tokenizer)  # fmt: skip
        generating = job.student_generation.mode != "off"
        if generating or not job.reset_optimizer_each_stage:  # these plan over every stage's steps
            total_steps = planned_steps(job.plan, dict(job.planned_rows), self.layout, lambda s: len(self._pool(s)))
        if not job.reset_optimizer_each_stage:
            self.optimization.start(self.model, job.plan[0].settings.lr, total_steps)
        if generating:
            self.generation = student_generation(
                job, self.state.replay, self.layout.rows_per_step, tokenizer=self.tokenizer, rank=self.host.rank,
                world=self.host.world, strategy=self.strategy, total_steps=total_steps,
            )  # fmt: skip
        has_heldout = job.teacher is not None and job.heldout
        batches = self.rows.heldout_batches(job.heldout, self.training.batch_size) if has_heldout else []
        self.heldout = HeldoutProbe(batches, job.loss, self.training.loss_chunk_tokens, self.precision, self.device,
                                    job.teacher_signal)  # fmt: skip
        if self.state.global_step == 0 and self.state.stage == 0:
            self._record_heldout(after_stage=-1)

    def build_model(self, checkpoint: Path | None) -> nn.Module:
        """Student (from the spec or the checkpoint) and frozen teacher, spread over workers by the strategy."""
        return self.strategy.build(ModelFactory(self.job, self.tokenizer, self.device, checkpoint, self.host.rank))

    def _pool(self, stage: StagePlan) -> Pool:
        """The stage's rows: each dataset opened once, when its first stage starts."""
        return self.rows.stage(stage.datasets)

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
        total = steps_of_stage(stage, len(pool), self.layout)
        steps_per_epoch = self.layout.steps_per_epoch(len(pool))
        if self.job.reset_optimizer_each_stage:
            self.optimization.start(self.model, stage.settings.lr, total)
        self.optimization.restore(self.model, self.state, self.strategy)
        settings = StepSettings.of_stage(stage.settings, self.job.loss, self.training, self.host.world)
        self.metrics.stage_start(stage, len(pool), self.host.world, f"{self.training.strategy}, {self.precision.name} "
                                 f"on {self.device}", total, steps_per_epoch)  # fmt: skip
        window, stage_window, plans = Window(), Window(), None
        for stage_step in range(self.state.stage_step, total):
            epoch, within = divmod(stage_step, steps_per_epoch)
            if plans is None or within == 0:
                seed = epoch_seed(self.job.seed, stage.index, epoch)
                plans = plan_epoch(pool.lengths, pool.scored_tokens, self.layout, seed)
            result, plan, source = self.step(pool, plans[within], settings)
            self.state.stage_step, self.state.global_step = stage_step + 1, self.state.global_step + 1
            self.state.tokens_seen += plan.num_items
            window.add(plan, source.value)
            stage_window.add(plan, source.value)
            # Every log_every_steps, and the last step of each stage: a short stage still reports its losses.
            if self.state.global_step % self.training.log_every_steps == 0 or stage_step + 1 == total:
                self._log_step(stage, epoch, result, plan, window)
                window = Window()
            every = self.training.checkpoint_every_steps
            if every and self.state.global_step % every == 0 and stage_step + 1 < total:
                self.save_checkpoint()
        self._append_metrics({"event": "stage_end", "stage": stage.index,
                              "padding_fraction": stage_window.padding_fraction})  # fmt: skip
        self._record_heldout(after_stage=stage.index)
        self.state.stage, self.state.stage_step = stage.index + 1, 0
        self.save_checkpoint(final=stage.index + 1 == self.job.stages_to_run)

    def step(self, pool: Pool, plan: StepPlan, settings: StepSettings) -> tuple[StepResult, StepPlan, Source]:
        """One optimizer step on the planned rows (or, with student generation, the student's samples)."""
        source = Source.REFERENCE
        if self.generation is not None:
            pool, plan, source = self.generation.step_rows(pool, plan, self.rows, self.layout,
                                                           self.state.global_step, self.model)  # fmt: skip
        pad = self.tokenizer.pad_token_id
        batches = [pool.micro_batch(rows, pad) for rows in plan.micro_batches(self.host.rank)]
        optimization = self.optimization
        result = train_step(
            self.model, batches, plan.num_items, optimizer=optimization.optimizer, scheduler=optimization.scheduler,
            scaler=optimization.scaler, settings=settings, precision=self.precision, device=self.device,
        )  # fmt: skip
        return result, plan, source

    # ----------------------------------------------------------------------------------------------------
    # Metrics and checkpoints

    def _log_step(self, stage: StagePlan, epoch: int, result: StepResult, plan: StepPlan, window: Window) -> None:
        """Reads the step's sums back (the only host sync of a step, and only at log steps)."""
        sums = all_reduce_sum(torch.stack([result.ce_sum, result.kd_sum]).float())
        ce, kd = (sums / max(plan.num_items, 1)).tolist()
        metrics = {"stage": stage.index, "epoch": epoch, "global_step": self.state.global_step, "ce": ce, "kd": kd,
                   "loss": mix(ce, kd, stage.settings.kd_weight), "lr": self.optimization.learning_rate,
                   "grad_norm": float(result.grad_norm), **window.throughput(self.state.tokens_seen)}  # fmt: skip
        if self.generation is not None:
            metrics.update(self.generation.times.take(window.elapsed()), sources=window.sources)
        self.latest_metrics = {k: metrics[k] for k in ("loss", "ce", "kd", "lr", "tokens_per_s")}
        self._append_metrics(metrics)
        if self.training.report_every_log_step:
            self.host.report(metrics, None)  # every rank, every log step: report is a barrier

    def _append_metrics(self, metrics: dict[str, Any]) -> None:
        self.metrics.append(metrics, self.state.global_step)

    def _record_heldout(self, after_stage: int) -> None:
        if (event := self.heldout.measure(self.model, self.strategy, after_stage)) is not None:
            self._append_metrics(event)

    def save_checkpoint(self, final: bool = False) -> None:
        """Report a checkpoint that resumes at ``self.state``'s position (collective: see ``checkpointer``)."""
        self.metrics.publish()  # rank 0's sinks, if any
        replay = self.generation.buffer.state() if self.generation is not None else None
        self.checkpointer.save(self.model, self.state, self.optimization, replay, self.latest_metrics, final)


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
