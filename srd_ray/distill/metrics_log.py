"""A training job's metrics: one JSON line per log step or event in ``metrics.jsonl`` (rank 0 writes), the
same values to TensorBoard / MLflow when ``metrics`` asks for them, and a readable line in the log.

Events: ``workers`` (where each rank runs), ``resumed``, ``heldout`` (the held-out KD metric),
``stage_end``; lines without an event are training steps.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from srd_ray import storage
from srd_ray.distill.metric_sinks import MetricSinks
from srd_ray.spec import MetricsSpec
from srd_ray.storage import Location

log = logging.getLogger(__name__)


@dataclass
class Window:
    """Steps since the last log line: throughput, padding and (student generation) steps per source."""

    started: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    positions: int = 0
    padding: int = 0
    sources: dict[str, int] = field(default_factory=dict)

    def add(self, plan: Any, source: str = "reference") -> None:
        """One step's plan (a ``batches.StepPlan``) and where its rows came from."""
        self.sources[source] = self.sources.get(source, 0) + 1
        self.tokens += plan.num_items
        self.positions += plan.positions
        self.padding += plan.padding

    @property
    def padding_fraction(self) -> float:
        return self.padding / max(self.positions, 1)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def throughput(self, tokens_seen: int) -> dict[str, float]:
        """A log line's throughput and padding fields for the window's steps."""
        return {"tokens_seen": tokens_seen, "tokens_per_s": self.tokens / max(self.elapsed(), 1e-9),
                "padding_fraction": self.padding_fraction}  # fmt: skip


class MetricsLog:
    """Rank 0's writer of a job's metrics (other ranks' appends do nothing)."""

    def __init__(self, path: str, rank: int, settings: MetricsSpec, job_name: str, run_name: str) -> None:
        self.path, self.rank = path, rank
        self.sinks = None
        if rank == 0 and (settings.tensorboard or settings.mlflow):
            self.sinks = MetricSinks(settings, Location.of(path).parent, job_name, run_name)

    def append(self, metrics: dict[str, Any], global_step: int) -> None:
        if self.rank != 0:
            return
        storage.append_line(self.path, json.dumps(metrics))
        if self.sinks is not None and metrics.get("event") in (None, "heldout"):
            self.sinks.log(metrics, metrics.get("global_step", global_step))
        log.info(*log_line(metrics))

    def stage_start(self, stage: Any, rows: int, world: int, how: str, total: int, per_epoch: int) -> None:
        """The log line that opens a curriculum stage (``stage``: a ``curriculum.StagePlan``)."""
        if self.rank == 0:
            log.info(
                "stage %d: %d rows from %s over %d worker(s) (%s), %d steps (%d per epoch), kd_weight %.2f, T %.2f",
                stage.index, rows, ",".join(stage.datasets), world, how, total, per_epoch,
                stage.settings.kd_weight, stage.settings.temperature,
            )  # fmt: skip

    def publish(self) -> None:
        """Before a checkpoint: the sinks' files brought up to date (they ride along with it)."""
        if self.sinks is not None:
            self.sinks.publish()

    def close(self) -> None:
        if self.sinks is not None:
            self.sinks.close()


def log_line(metrics: dict[str, Any]) -> tuple[Any, ...]:
    """The log's format string and arguments for one metrics line."""
    event = metrics.get("event")
    if event == "heldout":
        return "held-out KD loss after stage %d: %.4f", metrics["after_stage"], metrics["heldout_kd"]
    if event == "resumed":
        return "resuming at stage %d, step %d of the stage", metrics["stage"], metrics["stage_step"]
    if event == "workers":
        return "%d worker(s) on %d node(s)", len(metrics["nodes"]), len(set(metrics["nodes"]))
    if event == "stage_end":
        return "stage %d done: %.1f%% of positions were padding", metrics["stage"], 100 * metrics["padding_fraction"]
    return (
        "stage %d epoch %d step %d: loss %.4f (ce %.4f, kd %.4f), lr %.2e, %.0f tokens/s, %.0f%% padding%s",
        metrics["stage"], metrics["epoch"], metrics["global_step"], metrics["loss"], metrics["ce"], metrics["kd"],
        metrics["lr"], metrics["tokens_per_s"], 100 * metrics["padding_fraction"], _generation_note(metrics),
    )  # fmt: skip


def _generation_note(metrics: dict[str, Any]) -> str:
    """Student generation's share of the window, for the log line."""
    if "generate_s" not in metrics:
        return ""
    sources = ", ".join(f"{count} {name}" for name, count in sorted(metrics["sources"].items()))
    return (f"; steps: {sources}; generate {metrics['generate_s']:.1f}s, sync {metrics['sync_s']:.1f}s, "
            f"train {metrics['train_s']:.1f}s")  # fmt: skip
