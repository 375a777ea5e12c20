"""A run directory on an object store: ``output_dir: s3://...`` against a local S3 server (moto).

The server speaks the S3 protocol over HTTP on 127.0.0.1; pyarrow, Ray Data and Ray Train reach it
through the same environment a cluster would set (AWS_ENDPOINT_URL and credentials). A whole run on it,
killed and resumed, is ``test_several_nodes``'s."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from srd_ray import storage
from srd_ray.cli import main
from srd_ray.storage import Location
from tests.conftest import BUCKET
from tests.processes import object_keys, write_spec


def test_locations_name_local_paths_and_uris(tmp_path, object_store):
    local = Location.of(tmp_path) / "a" / "b.json"
    assert local.is_local and str(local) == str(tmp_path / "a" / "b.json")
    assert Location.of(f"file://{tmp_path}").is_local
    remote = Location.of(f"s3://{BUCKET}/runs/") / "x" / "run.json"
    assert str(remote) == f"s3://{BUCKET}/runs/x/run.json"
    assert (remote.name, str(remote.parent)) == ("run.json", f"s3://{BUCKET}/runs/x")


def test_object_store_writes_are_whole_and_folders_replaced(tmp_path, object_store, monkeypatch):
    folder = object_store / "unit"
    table = pa.table({"example_id": ["a", "b"], "rouge_l": [0.5, 1.0]})
    storage.write_parquet(folder / "t.parquet", table)
    assert (folder / "t.parquet").read_parquet().equals(table)
    storage.write_json(folder / "m.json", {"stages": {}})
    assert json.loads((folder / "m.json").read_text()) == {"stages": {}}
    storage.append_line(folder / "log.jsonl", '{"step": 1}')
    storage.append_line(folder / "log.jsonl", '{"step": 2}')
    assert (folder / "log.jsonl").read_text().splitlines() == ['{"step": 1}', '{"step": 2}']

    with storage.directory(folder / "model") as scratch:
        (scratch / "old.bin").write_bytes(b"old")
    with storage.directory(folder / "model") as scratch:
        (scratch / "config.json").write_text("{}")
        (scratch / "sub").mkdir()
        (scratch / "sub" / "w.bin").write_bytes(b"new")
    rewritten = object_keys(folder / "model")
    assert rewritten == ["config.json", "sub/w.bin"], "a rewritten folder keeps none of the old files"
    with pytest.raises(RuntimeError), storage.directory(folder / "broken") as scratch:
        (scratch / "half.bin").write_bytes(b"half")
        raise RuntimeError("writer died")
    assert not (folder / "broken").exists(), "a folder whose writer failed never appears"

    monkeypatch.setenv("SRD_CACHE_DIR", str(tmp_path / "cache"))
    first = storage.local_copy(folder / "model")
    assert (first / "sub" / "w.bin").read_bytes() == b"new"
    assert storage.local_copy(folder / "model") == first, "downloaded once"
    storage.write_text(folder / "model" / "config.json", '{"changed": true}')
    second = storage.local_copy(folder / "model")
    assert second != first and json.loads((second / "config.json").read_text()) == {"changed": True}


def test_unreachable_output_dir_is_refused_by_name(tmp_path, tiny_models, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    spec = write_spec(tmp_path, tiny_models, "data: {train: {path: /dev/null}}\n", name="unreachable")
    status = main(["run", str(spec), "--set", f"run.output_dir=s3://{BUCKET}/runs"])
    message = capsys.readouterr().err
    assert status == 2, message
    assert message.startswith(f"error: run.output_dir: cannot use s3://{BUCKET}/runs/unreachable"), message


def test_tensorboard_files_reach_an_object_store_run_and_mlflow_needs_a_server(object_store, tmp_path):
    """Review F17: on an object-store run, TensorBoard writes on rank 0's node and its files are uploaded to
    the stage folder; the default MLflow SQLite file would sit on one node's disk, so the spec refuses it."""
    from srd_ray.distill.metric_sinks import MetricSinks
    from srd_ray.spec import JobSpec, MetricsSpec

    stage_dir = object_store / "tb-run" / "distill"
    sinks = MetricSinks(MetricsSpec(tensorboard=True), stage_dir, "distill", "tb-run")
    sinks.log({"loss": 1.5, "lr": 1e-3}, step=1)
    sinks.publish()
    assert [name.startswith("events.out.tfevents") for name in object_keys(stage_dir / "tensorboard")] == [True]
    sinks.close()

    spec = {
        "run": {"name": "mlflow", "output_dir": f"s3://{BUCKET}/runs"},
        "models": {"teacher": {"path": "/m/t"}, "student": {"path": "/m/s"}},
        "data": {"train": {"path": "/d/train.jsonl"}},
        "distill": {"metrics": {"mlflow": True}},
    }
    with pytest.raises(ValueError, match=r"distill\.metrics\.mlflow_tracking_uri"):
        JobSpec.model_validate(spec)
    spec["distill"]["metrics"]["mlflow_tracking_uri"] = "http://mlflow:5000"
    assert JobSpec.model_validate(spec).distill.metrics.mlflow
