"""The Ray Train job: one ``TorchTrainer`` per training stage, resumable, with its checkpoints kept few.

The driver writes each dataset's rows to ``stage_dir/rows/<name>/`` (see ``rows``); every worker indexes
them, plans the same steps (see ``batches``) and reads the rows of its own micro-batches as it trains. A
rerun with the same ``stage_dir`` resumes from the last checkpoint Ray Train reported there. After
training, the final student is copied to ``stage_dir/model`` (atomically) and the stage summary is read
back from ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from srd_ray import storage
from srd_ray.devices import gpu_path_on_cpu, process_group_backend
from srd_ray.distill.batches import BatchLayout, stage_steps
from srd_ray.distill.parallel import check_gpu_precision
from srd_ray.distill.rows import write_rows
from srd_ray.distill.state import MERGED_DIR, MODEL_DIR
from srd_ray.distill.worker import TrainingJob, train_loop_per_worker
from srd_ray.progress import Progress
from srd_ray.storage import Location, Place

log = logging.getLogger(__name__)


def trained_model(stage_dir: Place) -> Location:
    """Where a training stage leaves its model (a save_pretrained folder, complete once the stage is)."""
    return Location.of(stage_dir) / "model"


def run_training(
    job: TrainingJob,
    datasets: dict[str, pa.Table],
    stage_dir: Place,
    rows: dict[str, int] | None = None,
    model_dir: Place | None = None,
) -> dict[str, Any]:
    """Train on ``datasets`` (each a table of training rows) with Ray Train and save the final model to
    ``model_dir`` (default ``stage_dir/model``). ``rows`` (per dataset; default the tables' sizes) lets the
    progress display know the total number of steps, including datasets a later job brings (refresh)."""
    stage_dir = Location.of(stage_dir)
    training = job.training
    if training.use_gpu and training.precision != "auto" and not gpu_path_on_cpu():
        check_gpu_precision(job.name, training.precision)
    job = dataclasses.replace(job, row_files=tuple(write_datasets(datasets, stage_dir / "rows").items()))
    rows = rows or {name: table.num_rows for name, table in datasets.items()}
    trainer = torch_trainer(job, stage_dir)
    started = time.perf_counter()
    with MetricsFollower(job.name, stage_dir / "metrics.jsonl", total_steps(job, rows or {})):
        result = _fit(trainer, job.name)
    wall = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError(f"{job.name}: training finished without a checkpoint")
    final = result.metrics or {}
    if final.get("stage") != job.stages_to_run:
        # An aborted run also returns a result; only the checkpoint taken after the last stage is the end.
        raise KeyboardInterrupt(f"{job.name} stopped at stage {final.get('stage')} before its last stage ended")
    _prune_checkpoints(result, stage_dir / "ray_train" / job.name)
    model_dir = Location.of(model_dir) if model_dir is not None else trained_model(stage_dir)
    with result.checkpoint.as_directory() as folder, storage.directory(model_dir) as scratch:
        source = Path(folder) / MERGED_DIR
        for item in (source if source.exists() else Path(folder) / MODEL_DIR).iterdir():
            shutil.copy2(item, scratch / item.name)
    records = read_metrics(stage_dir / "metrics.jsonl")
    return {
        "train_wall_s": round(wall, 2),
        "optimizer_steps": final.get("global_step"),
        "tokens_seen": final.get("tokens_seen"),
        "model": str(model_dir),
        "stages": stage_losses(records),
        "heldout_kd": heldout_losses(records),
        **generation_totals(records),
    }


def write_datasets(datasets: dict[str, pa.Table], folder: Location) -> dict[str, str]:
    """Each dataset's rows as ``folder/<name>/part-00000.parquet`` (see ``rows``); where each one is."""
    places = {}
    for name, table in datasets.items():
        write_rows(table, folder / name / "part-00000.parquet")
        places[name] = str(folder / name)
    return places


def torch_trainer(job: TrainingJob, stage_dir: Location) -> Any:
    """The Ray Train job: checkpoints go straight to the run directory's filesystem (local disk or object
    store), the newest ``keep_checkpoints`` kept. No Ray datasets: workers read the rows themselves."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    training = job.training
    resources = {"CPU": training.num_cpus_per_worker, **({"GPU": 1} if training.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend=process_group_backend(training.use_gpu)),
        scaling_config=ScalingConfig(
            num_workers=training.num_workers, use_gpu=training.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=job.name,
            storage_path=(stage_dir / "ray_train").path,
            storage_filesystem=stage_dir.filesystem,
            failure_config=FailureConfig(max_failures=training.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=training.keep_checkpoints),
        ),
    )


def generation_totals(records: list[dict[str, Any]]) -> dict[str, Any]:
    """With student generation: steps per source and the seconds spent generating, syncing and training."""
    steps = [r for r in records if "sources" in r]
    if not steps:
        return {}
    sources: dict[str, int] = {}
    for record in steps:
        for name, count in record["sources"].items():
            sources[name] = sources.get(name, 0) + count
    seconds = {key: round(sum(r[key] for r in steps), 2) for key in ("generate_s", "sync_s", "train_s")}
    return {"student_generation": {"steps_by_source": sources, **seconds}}


def total_steps(job: TrainingJob, rows: dict[str, int]) -> int:
    """Every stage's optimizer steps, as the workers will plan them (0 if the row counts are unknown)."""
    training = job.training
    layout = BatchLayout(training.batch_size, training.gradient_accumulation_steps, training.num_workers)
    if not all(name in rows for stage in job.plan for name in stage.datasets):
        return 0
    return sum(stage_steps(sum(rows[n] for n in stage.datasets), stage.settings, layout) for stage in job.plan)


class MetricsFollower:
    """While a job trains, follow the metrics its rank 0 appends and show them as live progress: step of
    total, loss, tokens/s, ETA (a background thread reading the file every couple of seconds)."""

    def __init__(self, name: str, path: Location, total: int) -> None:
        self.name, self.path, self.total = name, path, total
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name=f"{name}-progress", daemon=True)

    def __enter__(self) -> MetricsFollower:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _follow(self) -> None:
        seen = len(read_metrics(self.path))  # a resumed run has lines already
        with Progress(self.name, self.total or 1, "steps") as progress:
            stopped = False
            while not stopped:
                stopped = self._stop.wait(2.0)  # then one last read
                records = _safe_read(self.path)
                new, seen = records[seen:], max(seen, len(records))
                for record in new:
                    if record.get("event") == "resumed":  # the operator sees where a rerun picked up
                        log.info("%s: resuming at stage %d, step %d of the stage (global step %d)", self.name,
                                 record["stage"], record["stage_step"], record["global_step"])  # fmt: skip
                steps = [r for r in new if "event" not in r]
                if steps:
                    last = steps[-1]
                    progress.update(last["global_step"], stage=last["stage"], loss=last["loss"],
                                    **{"tokens/s": last["tokens_per_s"]})  # fmt: skip


def _safe_read(path: Location) -> list[dict[str, Any]]:
    """Complete lines only: the file may be mid-write."""
    try:
        lines = path.read_text().splitlines() if path.exists() else []
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.endswith("}")]


def _fit(trainer: Any, name: str) -> Any:
    sigint_handler = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    except SystemExit:
        # Ray Train handles Ctrl-C itself: it aborts the workers and exits. To srd it is an interruption
        # like any other (the stage is marked failed; a rerun resumes from the last checkpoint).
        raise KeyboardInterrupt(f"{name} interrupted") from None
    finally:
        # fit() leaves Ray's handler installed, which would turn a later Ctrl-C into a clean exit.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint_handler)


def _prune_checkpoints(result: Any, folder: Location) -> None:
    """Keep only the checkpoints Ray Train kept (the newest ``keep_checkpoints``). Ray deletes the older
    ones of its own run, not those left by a run it resumed: one reported just before an interruption but
    never registered, or the one a rerun started from."""
    kept = {Location(checkpoint.filesystem, checkpoint.path).name for checkpoint, _ in result.best_checkpoints or []}
    kept.add(Location(result.checkpoint.filesystem, result.checkpoint.path).name)
    for child in folder.children():
        if child.name.startswith("checkpoint_") and child.is_dir() and child.name not in kept:
            storage.delete(child)


def read_metrics(path: Location) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def heldout_losses(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Held-out KD loss before training (after_stage -1) and after each stage (the last record wins), with
    the teacher it was measured against: the model (online, exact) or the stored top-k signal."""
    latest = {r["after_stage"]: r for r in records if r.get("event") == "heldout"}
    return [
        {"after_stage": stage, "heldout_kd": r["heldout_kd"], "teacher_signal": r.get("teacher_signal", "online")}
        for stage, r in sorted(latest.items())
    ]


def stage_losses(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage: first and last logged losses, and the share of padded positions."""
    by_step: dict[int, dict] = {}
    padding: dict[int, float] = {}
    for record in records:
        if "event" not in record:
            by_step[record["global_step"]] = record  # a restarted worker group may log a step twice
        elif record["event"] == "stage_end":
            padding[record["stage"]] = record["padding_fraction"]
    stages: dict[int, list[dict]] = {}
    for record in sorted(by_step.values(), key=lambda r: r["global_step"]):
        stages.setdefault(record["stage"], []).append(record)
    return [
        {"stage": stage, "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
         "last_ce": records[-1]["ce"], "last_kd": records[-1]["kd"], "padding_fraction": padding.get(stage)}
        for stage, records in sorted(stages.items())
    ]  # fmt: skip
