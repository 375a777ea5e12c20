"""Shared fixtures: one local Ray for the whole run, and tiny models + demo data built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s, so a training job ends up to 2 s after its workers
# (and starts later): ~4 s per job, dozens of jobs in the suite. Local Rays and `ray start` inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eval"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that needs it (starting one costs ~6 s and 1 GB)."""
    import ray

    from srd_ray.pipeline import ensure_ray
    from srd_ray.spec import RaySpec

    ensure_ray(RaySpec(num_cpus=2, object_store_memory_mb=512))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict[str, str]:
    from srd_ray.demo_data import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo"), train_rows=160, heldout_rows=24, pretrain_rows=400, seed=0)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, demo_data) -> dict[str, str]:
    """A tiny teacher and student sharing a locally trained tokenizer, saved with save_pretrained."""
    import json

    from srd_ray.spec import TinyModelSpec, TinyModelsSpec
    from srd_ray.tiny_models import make_tiny_models

    rows = [json.loads(line) for line in Path(demo_data["train"]).read_text().splitlines()]
    texts = [row["prompt"] + row["output"] for row in rows]
    spec = TinyModelsSpec(
        vocab_size=400,
        teacher=TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2, pretrain_steps=20),
        student=TinyModelSpec(hidden_size=32, num_layers=1, num_heads=1, pretrain_steps=20),
        pretrain_batch_size=16,
    )
    return make_tiny_models(tmp_path_factory.mktemp("models"), spec, texts, texts, seed=0)


def shared_eval_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present (the real eval sets live in ../shared/data)")
    return path


BUCKET = "srd-runs"


@pytest.fixture(scope="module")
def object_store(tmp_path_factory):
    """A local S3 server with one bucket; the AWS variables point this process and its children at it."""
    from tests.processes import local_object_store

    with local_object_store(tmp_path_factory.mktemp("srd-cache"), BUCKET) as bucket:
        yield bucket
