"""Training metrics where users watch them: TensorBoard event files and an MLflow run, each written with
the library's own writer, besides ``metrics.jsonl`` (always). Only rank 0 writes.

A resumed stage appends to the same TensorBoard folder and continues the same MLflow run (found by the
stage folder it was made for), so its curves stay one curve.

For a run directory on an object store, TensorBoard writes on rank 0's node and its files are uploaded to
``<stage dir>/tensorboard`` with every checkpoint and at the end (a worker group restarted on another node
adds its own files beside them), and MLflow needs a tracking server (the spec refuses the default SQLite
file there: it would sit on one node's disk). On a shared file system prefer a server too: SQLite's locking
is unreliable over NFS.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from srd_ray import storage
from srd_ray.spec import MetricsSpec
from srd_ray.storage import Location

log = logging.getLogger(__name__)

# The per-step and per-event numbers worth a curve.
KEYS = (
    "loss", "ce", "kd", "lr", "grad_norm", "tokens_per_s", "padding_fraction", "heldout_kd",
    "generate_s", "sync_s", "train_s",  # student generation: the window's split
)  # fmt: skip


class MetricSinks:
    def __init__(self, spec: MetricsSpec, stage_dir: Location, name: str, run_name: str) -> None:
        self.name = name
        self._writer = None
        self._mlflow = None
        self._upload: tuple[Path, Location] | None = None
        if spec.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            folder = _local_folder(stage_dir, "tensorboard")
            self._writer = SummaryWriter(log_dir=str(folder))
            if not stage_dir.is_local:
                self._upload = folder, stage_dir / "tensorboard"
        if spec.mlflow:
            self._mlflow = _MlflowRun(spec.mlflow_tracking_uri or _file_store(stage_dir), run_name, stage_dir, name)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        values = {key: float(metrics[key]) for key in KEYS if isinstance(metrics.get(key), int | float)}
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(f"{self.name}/{key}", value, step)
            self._writer.flush()
        if self._mlflow is not None:
            self._mlflow.log(values, step)

    def publish(self) -> None:
        """Copy the TensorBoard files written on this node to the run directory (object stores only)."""
        if self._upload is None:
            return
        folder, target = self._upload
        for path in folder.iterdir():
            storage.write_bytes(target / path.name, path.read_bytes())

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self.publish()
        if self._mlflow is not None:
            self._mlflow.close()


class _MlflowRun:
    """One MLflow run per training stage, continued when the stage resumes."""

    def __init__(self, tracking_uri: str, experiment: str, stage_dir: Location, name: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        tag = f"tags.`srd.stage_dir` = '{stage_dir}'"
        runs = self.client.search_runs([experiment_id], filter_string=tag, max_results=1)
        if runs:
            self.run_id = runs[0].info.run_id
        else:
            tags = {"srd.stage_dir": str(stage_dir), "srd.stage": name}
            self.run_id = self.client.create_run(experiment_id, tags=tags, run_name=name).info.run_id
        log.info("%s: MLflow run %s in %s", name, self.run_id, tracking_uri)

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _local_folder(stage_dir: Location, name: str) -> Path:
    """``stage_dir/name`` on a local or shared disk; for a run directory on an object store, the same
    folder under $SRD_CACHE_DIR on this node (TensorBoard and MLflow's file store write files in place)."""
    if stage_dir.is_local:
        return Path(stage_dir.path) / name
    folder = storage.cache_dir() / name / stage_dir.path.replace("/", "_")
    log.info("%s for %s is written on this node: %s", name, stage_dir, folder)
    return folder


def _file_store(stage_dir: Location) -> str:
    """An SQLite tracking store in the run directory (MLflow's file store is in maintenance mode)."""
    folder = _local_folder(stage_dir.parent, "mlflow")
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder.resolve() / 'mlflow.db'}"
