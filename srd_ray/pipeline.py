"""The SRD pipeline: prepare → teacher_sft → reflect → rank → distill → evaluate, over one run directory.

Each stage reads the outputs of earlier stages from the run directory, so any stage can be run alone
(``srd run SPEC --stages rank``) once its inputs exist. A stage's fingerprint covers its own settings and
its upstream stages' fingerprints: change the student and reflect, rank, distill and evaluate are stale.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import pyarrow as pa

from srd_ray import storage
from srd_ray.data import LoadedData, drop_long_prompts, load_eval_sets, load_training_data
from srd_ray.demo_data import write_demo_data
from srd_ray.engines import check_context, resolve_engine
from srd_ray.errors import SpecError
from srd_ray.models import check_model_path, check_same_tokenizer, load_tokenizer
from srd_ray.run_dir import RunDirectory
from srd_ray.spec import JobSpec, ModelSpec, RaySpec
from srd_ray.storage import Location

log = logging.getLogger(__name__)

STAGES = ("prepare", "teacher_sft", "reflect", "rank", "teacher_signal", "distill", "evaluate")

# Spec sections each stage depends on (besides its upstream stages' fingerprints).
_TRAINING_DATA = (
    "data.train",
    "data.prompt_template",
    "data.prompt_template_no_input",
    "data.max_prompt_tokens",
    "data.max_response_tokens",
    "data.on_bad_row",
    "data.truncate_long_prompts",
)
_SECTIONS = {
    "prepare": ("prepare", "run.seed"),
    "teacher_sft": ("teacher_sft", "models.teacher", "run.seed", *_TRAINING_DATA),
    # The untrained student reflects; its LoRA settings (training only) do not change the scores.
    "reflect": (
        "reflect",
        *(f"models.student.{key}" for key in ("path", "dtype", "trust_remote_code")),
        *_TRAINING_DATA,
    ),
    "rank": ("rank", "run.seed"),
    # Which rows (the kept buckets, or all rows without a curriculum, plus the held-out KD rows) and how.
    "teacher_signal": (
        "teacher_signal",
        "models.teacher",
        "reflect.vllm",
        "rank.keep_buckets",
        "distill.curriculum",
        "distill.heldout_eval_set",
        "distill.heldout_rows",
        "data.eval_sets",
        *_TRAINING_DATA,
    ),
    "distill": ("distill", "models", "run.seed", *_TRAINING_DATA),
    "evaluate": ("evaluate", "models", "data.eval_sets", "data.max_prompt_tokens", "reflect.engine", "reflect.vllm"),
}
_UPSTREAM = {
    "prepare": (),
    "teacher_sft": ("prepare",),
    "reflect": ("prepare",),
    "rank": ("reflect",),
    "teacher_signal": ("prepare", "teacher_sft", "rank"),
    "distill": ("prepare", "teacher_sft", "rank", "teacher_signal"),
    "evaluate": ("prepare", "teacher_sft", "distill"),
}


def ensure_ray(spec: RaySpec) -> None:
    """Attach to the cluster a job runs in (RAY_ADDRESS, set by `ray job submit`), to a named address,
    or start a private local Ray.

    The private Ray starts no dashboard (so no HTTP or job server) and keeps Ray's token authentication,
    on by default for a new local Ray since 2.5x, unless RAY_AUTH_MODE says otherwise. It cannot listen on
    loopback only: Ray 2.60 swaps 127.0.0.1 for the machine's reachable address and its gRPC servers
    bind every interface, so the token is what keeps other hosts out."""
    import ray

    # Our own progress lines are enough; Ray Data's bars flood logs (and CPU) on long jobs.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or spec.address
    if address != "local":
        log.info("attaching to Ray at %s", address)
        ray.init(address=address)
        return
    ray.init(
        address="local",
        num_cpus=spec.num_cpus,
        num_gpus=spec.num_gpus,
        include_dashboard=False,
        object_store_memory=spec.object_store_memory_mb * 1024 * 1024,
    )


@dataclass
class Run:
    """What the stages share: the spec, the run directory, and lazily loaded inputs."""

    spec: JobSpec
    run_dir: RunDirectory
    fingerprints: dict[str, str] = field(default_factory=dict)

    @cached_property
    def train(self) -> LoadedData:
        return self._checked(load_training_data(self.spec.data))

    @cached_property
    def eval_sets(self) -> dict[str, LoadedData]:
        return {name: self._checked(loaded) for name, loaded in load_eval_sets(self.spec.data).items()}

    def _checked(self, loaded: LoadedData) -> LoadedData:
        if self.spec.data.truncate_long_prompts:
            return loaded
        tokenizer = load_tokenizer(self.spec.models.student)
        return drop_long_prompts(
            loaded, self.spec.data, lambda prompts: [len(ids) for ids in tokenizer(prompts)["input_ids"]]
        )

    @property
    def teacher(self) -> ModelSpec:
        """The teacher distillation uses: the fine-tuned one when teacher_sft is on."""
        if self.spec.teacher_sft.enabled:
            path = str(self.run_dir.stage_dir("teacher_sft") / "model")
            return self.spec.models.teacher.model_copy(update={"path": path, "adapter": None})  # merged before SFT
        return self.spec.models.teacher

    @property
    def rank_dir(self) -> Location | None:
        """The buckets SRD trains on (None for ``curriculum: none``, which trains on all rows)."""
        return self.run_dir.stage_dir("rank") if self.spec.distill.curriculum == "srd" else None

    @property
    def distilled_student(self) -> ModelSpec:
        path = str(self.run_dir.stage_dir("distill") / "model")
        return self.spec.models.student.model_copy(update={"path": path, "lora": None})  # saved merged


# --------------------------------------------------------------------------------------------------------
# Stages


def _prepare(run: Run) -> dict[str, Any]:
    from srd_ray.tiny_models import make_tiny_models

    prepare = run.spec.prepare
    out = run.run_dir.stage_dir("prepare")
    summary: dict[str, Any] = {}
    if prepare.demo_data:
        demo = prepare.demo_data
        summary["demo_data"] = write_demo_data(
            out,
            train_rows=demo.train_rows,
            heldout_rows=demo.heldout_rows,
            pretrain_rows=demo.pretrain_rows,
            seed=demo.seed,
        )
    if prepare.tiny_models:
        rows = run.train.table
        texts = [p + r for p, r in zip(rows["prompt"].to_pylist(), rows["response"].to_pylist(), strict=True)]
        pretrain_texts = texts
        if prepare.demo_data:
            pretrain = Location.of(summary["demo_data"]["pretrain"]).read_text().splitlines()
            pretrain_texts = [_prompt_and_output(line) for line in pretrain]
        summary["tiny_models"] = make_tiny_models(
            out, prepare.tiny_models, texts, pretrain_texts, seed=run.spec.run.seed
        )
    return summary


def _prompt_and_output(jsonl_line: str) -> str:
    record = json.loads(jsonl_line)
    return record["prompt"] + record["output"]


def _teacher_sft(run: Run) -> dict[str, Any]:
    from srd_ray.distill.stage import run_teacher_sft

    return run_teacher_sft(run.spec, run.train.table, run.run_dir.stage_dir("teacher_sft"))


def _reflect(run: Run) -> dict[str, Any]:
    from srd_ray.reflect import run_reflect

    summary = run_reflect(
        run.spec,
        run.train.table,
        run.run_dir.stage_dir("reflect"),
        engine=resolve_engine(run.spec.reflect.engine),
        teacher=run.teacher if run.spec.reflect.teacher_ce else None,
    )
    summary["skipped_rows"] = run.train.skipped
    return summary


def _rank(run: Run) -> dict[str, Any]:
    from srd_ray.rank import run_rank
    from srd_ray.reflect import read_scored

    scored = read_scored(run.run_dir.stage_dir("reflect"))
    with storage.directory(run.run_dir.stage_dir("rank")) as scratch:
        summary = run_rank(run.spec.rank, scored, scratch, seed=run.spec.run.seed)
        storage.write_json(scratch / "manifest.json", summary)
    return summary


def _teacher_signal(run: Run) -> dict[str, Any]:
    from srd_ray.distill.stage import training_rows
    from srd_ray.teacher_signal import run_teacher_signal

    rows = pa.concat_tables([training_rows(run.spec, run.rank_dir, run.train.table), heldout_rows(run)])
    engine = resolve_engine(run.spec.teacher_signal.engine)
    stage_dir = run.run_dir.stage_dir("teacher_signal")
    return run_teacher_signal(run.spec, rows, stage_dir, teacher=run.teacher, engine=engine)


def _distill(run: Run) -> dict[str, Any]:
    from srd_ray.distill.stage import run_distill

    signal_dir = run.run_dir.stage_dir("teacher_signal") if run.spec.distill.teacher_signal == "topk" else None
    return run_distill(
        run.spec,
        run.teacher,
        run.run_dir.stage_dir("distill"),
        rank_dir=run.rank_dir,
        train_rows=run.train.table,
        heldout_rows=heldout_rows(run),
        signal_dir=signal_dir,
    )


def heldout_rows(run: Run) -> pa.Table:
    """The eval rows of the held-out KD metric (none without eval sets)."""
    from srd_ray.distill.stage import TRAINING_COLUMNS

    distill = run.spec.distill
    name = distill.heldout_eval_set or next(iter(run.spec.data.eval_sets), None)
    if name is None:
        return pa.table({column: pa.array([], pa.string()) for column in TRAINING_COLUMNS})
    table = run.eval_sets[name].table.sort_by("input_position").slice(0, distill.heldout_rows)
    return table.select(TRAINING_COLUMNS)


def _evaluate(run: Run) -> dict[str, Any]:
    from srd_ray.evaluate import run_evaluate

    if not run.spec.data.eval_sets:
        return {"skipped": "no data.eval_sets"}
    models = {
        "teacher": run.teacher,
        "student_before": run.spec.models.student,
        "student_after": run.distilled_student,
    }
    eval_tables: dict[str, pa.Table] = {name: loaded.table for name, loaded in run.eval_sets.items()}
    results = {}
    for label in run.spec.evaluate.models:
        out = run.run_dir.stage_dir("evaluate") / label
        if (out / "summary.json").exists():  # finished before an interruption
            results[label] = json.loads((out / "summary.json").read_text())["sets"]
            continue
        log.info("evaluate: %s (%s)", label, models[label].path)
        engine = resolve_engine(run.spec.reflect.engine)
        results[label] = run_evaluate(
            run.spec.evaluate, run.spec.data, engine, run.spec.reflect.vllm, models[label], eval_tables, out
        )
    return results


def evaluate_model(spec: JobSpec, model_path: str, label: str) -> dict[str, Any]:
    """``srd evaluate --model``: any model folder on the spec's eval sets, into ``evaluate/<label>/``."""
    from srd_ray.evaluate import run_evaluate
    from srd_ray.spec import resolve_local_path

    if not spec.data.eval_sets:
        raise SpecError("data.eval_sets is empty: nothing to evaluate on")
    model = spec.models.student.model_copy(update={"path": resolve_local_path(model_path)})
    check_model_path(model, "--model")
    check_context(model, spec.data, spec.evaluate.generation.max_new_tokens, resolve_engine(spec.reflect.engine))
    eval_sets = {name: loaded.table for name, loaded in load_eval_sets(spec.data).items()}
    ensure_ray(spec.ray)
    out = Location.of(spec.run_dir) / "evaluate" / label
    engine = resolve_engine(spec.reflect.engine)
    return run_evaluate(spec.evaluate, spec.data, engine, spec.reflect.vllm, model, eval_sets, out)


RUNNERS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "prepare": _prepare,
    "teacher_sft": _teacher_sft,
    "reflect": _reflect,
    "rank": _rank,
    "teacher_signal": _teacher_signal,
    "distill": _distill,
    "evaluate": _evaluate,
}


def enabled_stages(spec: JobSpec) -> list[str]:
    stages = []
    for stage in STAGES:
        if stage == "prepare" and not (spec.prepare.demo_data or spec.prepare.tiny_models):
            continue
        if stage == "teacher_sft" and not spec.teacher_sft.enabled:
            continue
        if stage in ("reflect", "rank") and spec.distill.curriculum == "none":
            continue
        if stage == "teacher_signal" and spec.distill.teacher_signal != "topk":
            continue
        stages.append(stage)
    return stages


def stage_sections(spec: JobSpec, stage: str) -> tuple[str, ...]:
    """The spec sections a stage's outputs depend on (besides its upstream stages)."""
    if stage == "reflect" and spec.reflect.teacher_ce:  # scores the (fine-tuned) teacher too
        return (*_SECTIONS[stage], "models.teacher")
    return _SECTIONS[stage]


def fingerprints(spec: JobSpec) -> dict[str, str]:
    result: dict[str, str] = {}
    active = set(enabled_stages(spec))
    for stage in STAGES:
        upstream_stages = _UPSTREAM[stage]
        if stage == "reflect" and spec.reflect.teacher_ce:
            upstream_stages = (*upstream_stages, "teacher_sft")
        upstream = [result[u] for u in upstream_stages if u in active]
        result[stage] = spec.section_fingerprint(*stage_sections(spec, stage)) + ":" + ",".join(upstream)
    return result


def preflight(run: Run) -> None:
    """Check inputs before any stage output is written: data rows, model folders (and adapters, LoRA
    targets), shared tokenizer, GPUs asked for."""
    for role in ("teacher", "student"):
        check_model_path(getattr(run.spec.models, role), role)
    tokenizer = load_tokenizer(run.spec.models.student)
    check_same_tokenizer(load_tokenizer(run.spec.models.teacher), tokenizer)
    resolve_engine(run.spec.reflect.engine)
    if run.spec.distill.teacher_signal == "topk":
        resolve_engine(run.spec.teacher_signal.engine)
        if run.spec.teacher_signal.k > len(tokenizer):
            raise SpecError(
                f"teacher_signal.k is {run.spec.teacher_signal.k}, more than the {len(tokenizer)} tokens of the "
                "models' vocabulary"
            )
    engine = resolve_engine(run.spec.reflect.engine)
    check_context(run.spec.models.student, run.spec.data, run.spec.reflect.generation.max_new_tokens, engine)
    check_context(run.spec.models.teacher, run.spec.data, run.spec.evaluate.generation.max_new_tokens, engine)
    check_local_gpus(run.spec)
    _ = run.train, run.eval_sets  # load now: a bad row fails here, naming file and line


def check_local_gpus(spec: JobSpec) -> None:
    """A private local Ray gets this machine's GPUs: training that asks for GPUs where there are none would
    wait forever. (Attached to a cluster, GPU nodes may still be scaling up, so the run waits as Ray does.)"""
    if spec.ray.address != "local" or os.environ.get("RAY_ADDRESS"):
        return
    import torch

    gpus = spec.ray.num_gpus if spec.ray.num_gpus is not None else torch.cuda.device_count()
    for section in ("teacher_sft", "distill"):
        training = getattr(spec, section)
        if training.use_gpu and gpus == 0 and (section == "distill" or spec.teacher_sft.enabled):
            raise SpecError(
                f"{section}.use_gpu is true but the local Ray has no GPU on this machine: set "
                f"{section}.use_gpu: false, or attach to a GPU cluster (ray.address or RAY_ADDRESS)"
            )


def run_pipeline(spec: JobSpec, stages: list[str] | None = None, redo: list[str] | None = None) -> dict[str, Any]:
    """Run the selected stages (default: all enabled) and return the manifest."""
    enabled = enabled_stages(spec)
    for stage in [*(stages or []), *(redo or [])]:
        if stage not in STAGES:
            raise SpecError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    selected = [s for s in enabled if stages is None or s in stages]
    run = Run(spec=spec, run_dir=RunDirectory(spec), fingerprints=fingerprints(spec))
    prepare_pending = "prepare" in enabled and not run.run_dir.is_complete("prepare", run.fingerprints["prepare"])
    if prepare_pending and "prepare" not in selected:
        raise SpecError("the prepare stage has not run yet: run without --stages, or add prepare to --stages")
    if not prepare_pending:
        preflight(run)
    ensure_ray(spec.ray)
    for stage in redo or []:
        for downstream in STAGES[STAGES.index(stage) :]:
            run.run_dir.redo(downstream)
    for stage in selected:
        fingerprint = run.fingerprints[stage]
        if run.run_dir.is_complete(stage, fingerprint):
            log.info("%s: already complete, skipping", stage)
            continue
        run.run_dir.check_fingerprint(stage, fingerprint, stage_sections(run.spec, stage))
        log.info("%s: starting", stage)
        run.run_dir.start(stage, fingerprint)
        try:
            summary = RUNNERS[stage](run)
        except BaseException as error:
            run.run_dir.fail(stage, error)
            raise
        run.run_dir.complete(stage, summary)
        log.info("%s: complete in %.1fs", stage, run.run_dir.stage_record(stage)["wall_s"])
        if stage == "prepare":
            preflight(run)
    return run.run_dir.manifest


def summary_lines(manifest: dict[str, Any]) -> list[str]:
    """A short human summary of a run: rows, buckets, losses, eval scores."""
    stages = manifest["stages"]
    lines = [f"run {manifest['run']}"]
    reflect = stages.get("reflect", {}).get("summary")
    if reflect:
        lines.append(
            f"  reflect ({reflect.get('engine', '?')} engine): {reflect['rows']} rows, "
            f"mean ROUGE-L {reflect['mean_rouge_l']:.3f}, mean student CE {reflect['mean_student_ce']:.3f}, "
            f"{len(reflect.get('skipped_rows', [])) + len(reflect.get('rejected_rows', []))} skipped"
        )
    rank = stages.get("rank", {}).get("summary")
    if rank:
        for bucket in rank["buckets"]:
            truth = bucket.get("mean_true_difficulty")
            lines.append(
                f"  bucket {bucket['bucket']}{'' if bucket['kept'] else ' (dropped)'}: {bucket['rows']} rows, "
                f"ROUGE-L {bucket['rouge_l']['mean']:.3f}, CE {bucket['student_ce']['mean']:.3f}"
                + (f", true difficulty {truth:.2f}" if truth is not None else "")
            )
    for name in ("teacher_sft", "distill"):
        summary = stages.get(name, {}).get("summary")
        if summary:
            losses = ", ".join(
                f"stage {s['stage']} {s['first_loss']:.3f}->{s['last_loss']:.3f}" for s in summary["stages"]
            )
            lines.append(
                f"  {name}: {summary['optimizer_steps']} steps, {summary['tokens_seen']} tokens, "
                f"{summary['train_wall_s']:.1f}s; loss {losses}"
            )
    evaluation = stages.get("evaluate", {}).get("summary")
    if evaluation and "skipped" not in evaluation:
        sets = sorted({name for result in evaluation.values() for name in result})
        lines.append("  ROUGE-L (x100, mean ± std over seeds):")
        lines.append("    " + f"{'model':<16}" + "".join(f"{name:>18}" for name in sets))
        for label, result in evaluation.items():
            cells = "".join(
                f"{result[name]['rouge_l']:>11.2f} ± {result[name]['rouge_l_std']:<4.2f}"
                if name in result
                else f"{'-':>18}"
                for name in sets
            )
            lines.append(f"    {label:<16}{cells}")
    return lines
