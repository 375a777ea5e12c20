"""The package's shape (#31): ``srd validate`` imports no torch, and imports point down
(``scripts/imports.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import imports  # noqa: E402  (scripts/imports.py)

# What is left of the upward imports (distill's refresh calling back into reflect and rank): the pipeline is to
# sequence distill stage s -> refresh -> stage s + 1 instead. This list may only shrink.
KNOWN_UPWARD = {
    ("srd_ray.distill.refresh", "srd_ray.rank"),
    ("srd_ray.distill.refresh", "srd_ray.reflect"),
    ("srd_ray.distill.stage", "srd_ray.rank"),
    ("srd_ray.distill.stage", "srd_ray.teacher_signal"),
}
KNOWN_CYCLES = [["srd_ray.distill.refresh", "srd_ray.distill.stage"]]


def test_validate_imports_no_torch():
    code = (
        "import sys; from srd_ray.cli import main; rc = main(['validate', 'jobs/quickstart.yaml']); "
        "heavy = [m for m in ('torch', 'transformers', 'ray', 'vllm') if m in sys.modules]; "
        "assert rc == 0 and not heavy, (rc, heavy)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "distill:" in done.stdout, "validate printed the spec"


def test_generic_modules_import_no_stage_and_no_new_upward_import_or_cycle():
    edges = imports.graph()
    found = set(imports.upward(edges))
    generic = {(s, t) for s, t in found if imports.layer(s)[0] == 2}
    assert not generic, f"generic modules importing stages or orchestration: {sorted(generic)}"
    assert found <= KNOWN_UPWARD, f"new upward imports: {sorted(found - KNOWN_UPWARD)}"
    assert all(cycle in KNOWN_CYCLES for cycle in imports.cycles(edges)), imports.cycles(edges)


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
