"""What each stage asks the cluster for, checked before the stage starts: never a stage that waits forever.

A stage's processes are its engine actors (reflect, the teacher pass, evaluate), its Train workers, and,
during distillation with on-policy generation on vLLM, the generation actors beside the workers. All of a
stage's processes must hold their resources at once: Ray Data's actor pools start every actor, Ray Train
places every worker, and worker 0 waits for the generation actors while the other workers wait in a
collective. A stage that asks for more than the cluster can give used to hang with no message (review F4:
a generation actor waiting for a CPU its own Train worker held; rank 0 waiting for a GPU that never came
while the other ranks timed out in NCCL).

Core (pure): :func:`stage_asks` (the spec → what each stage's processes ask for) and
:func:`placement_problem` (first-fit decreasing of those processes onto the nodes' capacities; what does
not fit, in words naming the setting and the numbers). Driver: :func:`check_stage` compares with the
cluster as it is and as its autoscaler may grow it (``ray.nodes()`` and the autoscaler's node types): a
stage that can never fit is refused at once (exit 2); one that may fit once nodes join waits, saying so,
for at most ``run.resource_timeout_s``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from srd_ray.errors import ResourceError
from srd_ray.spec import JobSpec

log = logging.getLogger(__name__)

POLL_S = 5.0


@dataclass(frozen=True)
class Ask:
    """``count`` processes of one kind, each asking for ``cpus`` and ``gpus``; ``setting`` sizes them."""

    setting: str  # the spec section whose keys set count and size, e.g. "distill.student_generation"
    what: str  # "reflect actors", "distill workers", ...
    count: int
    cpus: float
    gpus: float
    cpu_key: str = "num_cpus_per_actor"  # the keys (in ``setting``) that set each process's size
    gpu_key: str = "num_gpus_per_actor"

    def __str__(self) -> str:
        return f"{self.count} {self.what} ({self.cpus:g} CPU, {self.gpus:g} GPU each)"


def stage_asks(spec: JobSpec, stage: str, generation_engine: str = "transformers") -> list[Ask]:
    """The processes ``stage`` runs at once (none for stages that run in the driver: prepare, rank).
    ``generation_engine``: distillation's resolved student-generation engine (vllm runs actors)."""
    if stage in ("reflect", "teacher_signal", "evaluate"):
        pool = getattr(spec, stage)
        return [Ask(stage, f"{stage} actors", pool.concurrency, pool.num_cpus_per_actor, pool.num_gpus_per_actor)]
    if stage in ("teacher_sft", "distill"):
        training = getattr(spec, stage)
        asks = [Ask(stage, f"{stage} workers", training.num_workers, training.num_cpus_per_worker,
                    1.0 if training.use_gpu else 0.0, "num_cpus_per_worker", "use_gpu")]  # fmt: skip
        generation = spec.distill.student_generation
        if stage == "distill" and generation.mode != "off" and generation_engine == "vllm":
            asks.append(Ask("distill.student_generation", "generation actors", generation.concurrency,
                            generation.num_cpus_per_actor, generation.num_gpus_per_actor))  # fmt: skip
        return asks
    if stage == "lm_eval":  # one model at a time, with evaluate's per-actor resources
        pool = spec.evaluate
        return [Ask("evaluate", "lm-eval task", 1, pool.num_cpus_per_actor, pool.num_gpus_per_actor)]
    return []


def vllm_without_gpu(spec: JobSpec, engines: dict[str, str]) -> str | None:
    """On a run that trains on GPUs, a vLLM pass whose actors ask for no GPU would start the CUDA build of
    vLLM without one (review F4). ``engines``: each pass's resolved engine, by its spec section."""
    if not (spec.distill.use_gpu or (spec.teacher_sft.enabled and spec.teacher_sft.use_gpu)):
        return None
    for section, engine in engines.items():
        pool = spec.distill.student_generation if section == "distill.student_generation" else getattr(spec, section)
        if engine == "vllm" and pool.num_gpus_per_actor == 0:
            return (
                f"{section}.num_gpus_per_actor is 0, but this run trains on GPUs and {section} runs vLLM, whose "
                f"GPU build needs a GPU: set {section}.num_gpus_per_actor (1 is usual), or its engine to transformers"
            )
    return None


def _resources(node: dict[str, float]) -> tuple[float, float]:
    return float(node.get("CPU", 0.0)), float(node.get("GPU", 0.0))


def placement_problem(asks: list[Ask], nodes: list[dict[str, float]]) -> str | None:
    """Why ``asks`` cannot all hold their resources at once on ``nodes`` (each a node's total resources),
    or None if they can: every process placed, largest first, on the first node with room left."""
    demand = [(ask.gpus, ask.cpus, ask) for ask in asks for _ in range(ask.count) if ask.cpus or ask.gpus]
    free = [list(_resources(node)) for node in nodes]
    for gpus, cpus, ask in sorted(demand, key=lambda item: (item[0], item[1]), reverse=True):
        node = next((n for n in free if n[0] >= cpus - 1e-9 and n[1] >= gpus - 1e-9), None)
        if node is None:
            return _shortfall(ask, asks, nodes)
        node[0] -= cpus
        node[1] -= gpus
    return None


def _shortfall(failed: Ask, asks: list[Ask], nodes: list[dict[str, float]]) -> str:
    total_cpus, total_gpus = (sum(_resources(node)[i] for node in nodes) for i in (0, 1))
    largest = max(nodes, key=lambda node: _resources(node)[::-1], default={})
    need_cpus, need_gpus = sum(a.count * a.cpus for a in asks), sum(a.count * a.gpus for a in asks)
    most_gpus = max((_resources(node)[1] for node in nodes), default=0.0)
    if failed.gpus > most_gpus:
        has = "no GPU" if most_gpus == 0 else f"at most {most_gpus:g} GPU on one node"
        return (f"{failed.setting}.{failed.gpu_key}: each of its {failed.what} asks for {failed.gpus:g} GPU, but "
                f"the cluster has {has}")  # fmt: skip
    if not any(_resources(node)[0] >= failed.cpus and _resources(node)[1] >= failed.gpus for node in nodes):
        cpus, gpus = _resources(largest)
        return (f"{failed.setting}.{failed.cpu_key}: each of its {failed.what} asks for {failed.cpus:g} CPU and "
                f"{failed.gpus:g} GPU, but no node has that much (the largest: {cpus:g} CPU, {gpus:g} "
                "GPU)")  # fmt: skip
    return (
        f"{failed.setting}: the stage runs {' and '.join(map(str, asks))} at once, {need_cpus:g} CPU and "
        f"{need_gpus:g} GPU in all, but the cluster has {total_cpus:g} CPU and {total_gpus:g} GPU on "
        f"{len(nodes)} node(s)"
    )


# --------------------------------------------------------------------------------------------------------
# Against the cluster


def cluster_nodes() -> list[dict[str, float]]:
    """The total resources of every alive node."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def autoscaling_nodes() -> list[dict[str, float]] | None:
    """The nodes the autoscaler may add (each node type up to its max count), or None when the cluster
    publishes no autoscaling config (a private Ray, or nodes joined by hand)."""
    from ray._private.state import state

    try:
        config = state.get_cluster_config()
    except Exception:  # a private API: without it, nothing is known about growth
        return None
    if config is None:
        return None
    nodes = []
    for group in config.node_group_configs:
        count = group.max_count if group.max_count >= 0 else 64  # unbounded: plenty, but finite
        nodes += [dict(group.resources)] * count
    return nodes


def this_machine(spec: JobSpec) -> list[dict[str, float]]:
    """The one node of a private local Ray, as Ray will count it (``ray.num_cpus`` / ``ray.num_gpus``, else
    every core and CUDA device): known before Ray starts, so a stage that cannot fit is refused before
    anything is written."""
    import os

    import torch

    cpus = spec.ray.num_cpus if spec.ray.num_cpus is not None else os.cpu_count() or 1
    gpus = spec.ray.num_gpus if spec.ray.num_gpus is not None else torch.cuda.device_count()
    return [{"CPU": float(cpus), "GPU": float(gpus)}]


def refuse_if_impossible(spec: JobSpec, stages: list[str], generation_engine: str, nodes: list[dict[str, float]]
                         ) -> None:  # fmt: skip
    """Refuse the run before it starts if one of ``stages`` can never fit on ``nodes``."""
    for stage in stages:
        problem = placement_problem(stage_asks(spec, stage, generation_engine), nodes)
        if problem is not None:
            raise ResourceError(problem)


def check_stage(spec: JobSpec, stage: str, generation_engine: str, *, local: bool) -> None:
    """Before ``stage`` starts: refuse it (exit 2) if the cluster can never hold its processes; if more
    nodes may join (an autoscaler, or a cluster others add nodes to), say so and wait for them, at most
    ``run.resource_timeout_s``."""
    asks = stage_asks(spec, stage, generation_engine)
    if not asks or (problem := placement_problem(asks, cluster_nodes())) is None:
        return
    growth = None if local else autoscaling_nodes()
    if local or (growth is not None and placement_problem(asks, cluster_nodes() + growth) is not None):
        raise ResourceError(problem + ("" if local else ", and its autoscaler cannot add enough"))
    timeout = spec.run.resource_timeout_s
    log.warning("%s: waiting up to %ds for nodes to join: %s", stage, timeout, problem)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(POLL_S)
        problem = placement_problem(asks, cluster_nodes())
        if problem is None:
            log.info("%s: the cluster now holds what the stage asks for", stage)
            return
    raise ResourceError(f"{problem} (after waiting {timeout}s for nodes: run.resource_timeout_s)")
