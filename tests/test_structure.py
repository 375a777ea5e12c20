"""The package's shape (#31): ``srd validate`` imports no torch, and imports point down
(``scripts/imports.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import imports  # noqa: E402  (scripts/imports.py)


def test_validate_imports_no_torch():
    code = (
        "import sys; from srd_ray.cli import main; rc = main(['validate', 'jobs/quickstart.yaml']); "
        "heavy = [m for m in ('torch', 'transformers', 'ray', 'vllm') if m in sys.modules]; "
        "assert rc == 0 and not heavy, (rc, heavy)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "distill:" in done.stdout, "validate printed the spec"


def test_imports_point_down_and_make_no_cycle():
    """Generic modules import no stage; a stage (the distill package included) imports no other stage and
    no orchestration; nothing imports in a circle (the pipeline sequences distill and rank.refresh)."""
    edges = imports.graph()
    assert imports.upward(edges) == []
    assert imports.cycles(edges) == []


def test_the_import_checker_finds_planted_upward_imports_and_cycles():
    edges = {
        "srd_ray.models": {"srd_ray.distill.losses"},  # generic -> stage
        "srd_ray.rank": {"srd_ray.pipeline"},  # stage -> orchestration
        "srd_ray.distill.a": {"srd_ray.distill.b", "srd_ray.storage"},
        "srd_ray.distill.b": {"srd_ray.distill.a"},
        "srd_ray.storage": set(),
    }
    assert imports.upward(edges) == [("srd_ray.models", "srd_ray.distill.losses"), ("srd_ray.rank", "srd_ray.pipeline")]
    assert imports.cycles(edges) == [["srd_ray.distill.a", "srd_ray.distill.b"]]


def test_the_reflect_writer_actor_loads_no_torch(tmp_path):
    """The writer actor of the reflect pass computes ROUGE-L and writes Parquet: what it is built from
    (pickled by Ray as here) must not pull in torch or transformers, which cost it seconds of CPU while the
    engines start, and hundreds of MB."""
    from ray import cloudpickle

    from srd_ray.reflect import SETTINGS_KEY
    from srd_ray.reflect_columns import add_rouge, shard_columns
    from srd_ray.shards import ShardedPass, ShardWriter
    from srd_ray.storage import Location

    writer = ShardWriter(ShardedPass("reflect", Location.of(tmp_path), SETTINGS_KEY, {}), add_rouge, shard_columns, "n")
    (tmp_path / "writer.pkl").write_bytes(cloudpickle.dumps(writer.settings()))
    code = (
        "import pickle, sys; settings = pickle.load(open(sys.argv[1], 'rb')); "
        "heavy = [m for m in ('torch', 'transformers', 'vllm') if m in sys.modules]; "
        "assert settings['finish'].__name__ == 'add_rouge' and not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "writer.pkl")], cwd=ROOT, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
