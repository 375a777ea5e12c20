"""The SRD pipeline: prepare → teacher_sft → reflect → rank → teacher_signal → distill → evaluate, over
one run directory.

Every stage is one row of :data:`STAGES`: the spec sections its outputs depend on, the stages whose outputs
it reads, what it leaves in its folder, when it is on, and its runner. Fingerprints, the check that a
stage's inputs exist, and ``--stages`` / ``--redo`` all read that table. Each stage reads the outputs of
earlier stages from the run directory, so any stage can be run alone (``srd run SPEC --stages rank``) once
its inputs exist. A stage's fingerprint covers its own settings and its upstream stages' fingerprints:
change the student and reflect, rank, distill and evaluate are stale.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import pyarrow as pa

from srd_ray import auto
from srd_ray.console import adopt_library_loggers, attach_run_log, log_traceback
from srd_ray.console import verbose as console_is_verbose
from srd_ray.data import LoadedData, drop_bad_rows, drop_long_prompts, load_eval_sets, load_training_data
from srd_ray.demo_data import write_demo_data
from srd_ray.engines import check_context
from srd_ray.errors import ModelError, NothingToDo, SpecError
from srd_ray.failures import explain
from srd_ray.models import check_model_path, check_same_tokenizer, load_tokenizer
from srd_ray.resources import check_stage
from srd_ray.run_dir import RunDirectory
from srd_ray.shared_storage import check_every_node_sees
from srd_ray.spec import JobSpec, ModelSpec, RaySpec
from srd_ray.storage import Location
from srd_ray.strata import check_stratification

log = logging.getLogger(__name__)

# Spec sections every stage that reads the training rows depends on.
TRAINING_DATA = (
    "data.train",
    "data.prompt_template",
    "data.prompt_template_no_input",
    "data.max_prompt_tokens",
    "data.max_response_tokens",
    "data.on_bad_row",
    "data.truncate_long_prompts",
)


def ensure_ray(spec: RaySpec, verbose: bool = False) -> None:
    """Attach to the cluster a job runs in (RAY_ADDRESS, set by `ray job submit`), to a named address,
    or start a private local Ray.

    The private Ray keeps Ray's token authentication (on by default for a new local Ray since 2.5x, unless
    RAY_AUTH_MODE says otherwise) and serves its dashboard on 127.0.0.1 only: Ray Train's placement-group
    cleaner asks the dashboard's state API whether the training run is alive, and without one it floods the
    log with warnings and stalls 12 s at the end of every training stage. Its actors are told the
    dashboard's address, as Ray's own lookup can pick another cluster on a machine that runs several. Ray
    cannot listen on loopback only otherwise: it swaps 127.0.0.1 for the machine's reachable address and
    its gRPC servers bind every interface, so the token is what keeps other hosts out.

    Workers' own output reaches this console only with ``verbose``; it is in Ray's session logs (linked
    from the run's logs/ folder) either way."""
    import ray

    # Our own progress display is enough; Ray Data's bars flood logs (and CPU) on long jobs.
    ray.data.DataContext.get_current().enable_progress_bars = False
    if ray.is_initialized():
        return
    adopt_library_loggers()
    try:
        _init_ray(spec, verbose)
    finally:
        adopt_library_loggers()


def _init_ray(spec: RaySpec, verbose: bool) -> None:
    import ray

    address = os.environ.get("RAY_ADDRESS") or spec.address
    if address != "local":
        log.info("attaching to Ray at %s", address)
        ray.init(address=address, log_to_driver=verbose)
        return
    port = _free_port()
    ray.init(
        address="local",
        num_cpus=spec.num_cpus,
        num_gpus=spec.num_gpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        object_store_memory=spec.object_store_memory_mb * 1024 * 1024,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
        log_to_driver=verbose,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Run:
    """What the stages share: the spec, the run directory, and lazily loaded inputs."""

    spec: JobSpec
    run_dir: RunDirectory
    fingerprints: dict[str, str] = field(default_factory=dict)
    stages: tuple[str, ...] = ()  # the stages this command runs

    @property
    def private_ray(self) -> bool:
        """A local Ray of this command's own (not attached to a cluster): no node will join it."""
        return self.spec.ray.address == "local" and not os.environ.get("RAY_ADDRESS")

    @cached_property
    def generation_engine(self) -> str:
        """distill.student_generation's resolved engine (vllm runs actors beside the Train workers)."""
        from srd_ray.distill_stage import generation_engine

        return generation_engine(self.spec)

    def pass_engines(self) -> dict[str, str]:
        """Each inference pass this command runs, by its spec section, with its resolved engine."""
        engines = {"reflect": self.engine, "evaluate": self.engine}
        if self.spec.distill.teacher_signal == "topk":
            engines["teacher_signal"] = auto.engine(self.spec.teacher_signal.engine, "teacher_signal.engine")
        if self.spec.distill.student_generation.mode != "off":
            engines["distill.student_generation"] = self.generation_engine
        return {section: engine for section, engine in engines.items() if section.split(".")[0] in self.stages}

    @cached_property
    def train(self) -> LoadedData:
        loaded = self._checked(load_training_data(self.spec.data))
        hand_freed_memory_back()  # parsing and checking the rows left several times the table's size free
        return loaded

    @cached_property
    def eval_sets(self) -> dict[str, LoadedData]:
        return {name: self._checked(loaded) for name, loaded in load_eval_sets(self.spec.data).items()}

    def _checked(self, loaded: LoadedData) -> LoadedData:
        loaded = self._same_assistant_tokens(loaded)
        if self.spec.data.truncate_long_prompts:
            return loaded
        tokenizer = load_tokenizer(self.spec.models.student)
        return drop_long_prompts(
            loaded, self.spec.data, lambda prompts: [len(ids) for ids in tokenizer(prompts)["input_ids"]]
        )

    def _same_assistant_tokens(self, loaded: LoadedData) -> LoadedData:
        """Chat rows with a teacher whose own chat template differs from the student's: a row whose assistant
        tokens differ between the two renderings is a bad row (naming the first differing token)."""
        from srd_ray.encoding import CHAT_COLUMN, RowFormat, template_mismatches

        data, models = self.spec.data, self.spec.models
        if CHAT_COLUMN not in loaded.table.column_names or data.chat_template != "model":
            return loaded
        try:
            student, teacher = load_tokenizer(models.student), load_tokenizer(models.teacher)
        except ModelError:  # made by the prepare stage: one tokenizer for both
            return loaded
        if student.chat_template == teacher.chat_template:
            return loaded
        problems = template_mismatches(loaded.table, RowFormat(student, data), RowFormat(teacher, data))
        return drop_bad_rows(loaded, data, problems, "every chat renders other assistant tokens for the teacher")

    @property
    def teacher(self) -> ModelSpec:
        """The teacher distillation uses: the fine-tuned one when teacher_sft is on."""
        from srd_ray.distill.driver import trained_model

        if self.spec.teacher_sft.enabled:
            path = str(trained_model(self.run_dir.stage_dir("teacher_sft")))
            return self.spec.models.teacher.model_copy(update={"path": path, "adapter": None})  # merged before SFT
        return self.spec.models.teacher

    @property
    def rank_dir(self) -> Location | None:
        """The buckets SRD trains on (None for ``curriculum: none``, which trains on all rows)."""
        return self.run_dir.stage_dir("rank") if self.spec.distill.curriculum == "srd" else None

    @property
    def distilled_student(self) -> ModelSpec:
        from srd_ray.distill.driver import trained_model

        path = str(trained_model(self.run_dir.stage_dir("distill")))
        return self.spec.models.student.model_copy(update={"path": path, "lora": None})  # saved merged

    @property
    def engine(self) -> str:
        return auto.engine(self.spec.engine.name)


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
            chat=demo.chat,
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
    from srd_ray.distill_stage import run_teacher_sft

    return run_teacher_sft(run.spec, run.train.table, run.run_dir.stage_dir("teacher_sft"))


def _reflect(run: Run) -> dict[str, Any]:
    from srd_ray.reflect import run_reflect

    summary = run_reflect(
        run.spec,
        run.train.table,
        run.run_dir.stage_dir("reflect"),
        engine=run.engine,
        teacher=run.teacher if run.spec.reflect.teacher_ce else None,
    )
    summary["skipped_rows"] = run.train.skipped
    return summary


def _rank(run: Run) -> dict[str, Any]:
    from srd_ray.rank import run_rank
    from srd_ray.reflect import read_scored
    from srd_ray.strata import task_column

    scored = read_scored(run.run_dir.stage_dir("reflect"), run.train.table)
    task = task_column(run.spec.data.train.fields.task, scored.column_names)
    return run_rank(run.spec.rank, scored, run.run_dir.stage_dir("rank"), seed=run.spec.run.seed, task_column=task)


def _teacher_signal(run: Run) -> dict[str, Any]:
    from srd_ray.distill_stage import training_rows
    from srd_ray.teacher_signal import run_teacher_signal, unique_rows

    # Made unique here, so the training rows' copy is gone before the pass (the driver holds one copy).
    rows = unique_rows(pa.concat_tables([training_rows(run.spec, run.rank_dir, run.train.table), heldout_rows(run)]))
    stage_dir = run.run_dir.stage_dir("teacher_signal")
    engine = auto.engine(run.spec.teacher_signal.engine, "teacher_signal.engine")
    return run_teacher_signal(run.spec, rows, stage_dir, teacher=run.teacher, engine=engine)


def _distill(run: Run) -> dict[str, Any]:
    from srd_ray.distill_stage import run_distill
    from srd_ray.refresh import Reflector

    spec = run.spec
    reflector = Reflector(spec, run.engine, run.teacher if spec.reflect.teacher_ce else None)
    signal_dir = run.run_dir.stage_dir("teacher_signal") if run.spec.distill.teacher_signal == "topk" else None
    return run_distill(
        run.spec,
        run.teacher,
        run.run_dir.stage_dir("distill"),
        rank_dir=run.rank_dir,
        train_rows=run.train.table,
        heldout_rows=heldout_rows(run),
        signal_dir=signal_dir,
        reflector=reflector,
    )


def heldout_rows(run: Run) -> pa.Table:
    """The eval rows of the held-out KD metric (none without eval sets)."""
    from srd_ray.encoding import TEXT_COLUMNS, training_text

    distill = run.spec.distill
    name = distill.heldout_eval_set or next(iter(run.spec.data.eval_sets), None)
    if name is None:
        return pa.table({column: pa.array([], pa.string()) for column in TEXT_COLUMNS})
    table = run.eval_sets[name].table.sort_by("input_position").slice(0, distill.heldout_rows)
    return training_text(table)


def _evaluate(run: Run) -> dict[str, Any]:
    from srd_ray.evaluate import evaluate_once

    if not run.spec.data.eval_sets:
        return {"skipped": "no data.eval_sets"}
    eval_tables: dict[str, pa.Table] = {name: loaded.table for name, loaded in run.eval_sets.items()}
    return {
        label: evaluate_once(run.spec, run.engine, model, eval_tables, run.run_dir.stage_dir("evaluate") / label)
        for label, model in evaluated_models(run).items()
    }


def evaluated_models(run: Run) -> dict[str, ModelSpec]:
    """The models ``evaluate.models`` names, by label: the teacher, the student before and after."""
    models = {"teacher": run.teacher, "student_before": run.spec.models.student, "student_after": run.distilled_student}
    return {label: models[label] for label in run.spec.evaluate.models}


def _lm_eval(run: Run) -> dict[str, Any]:
    from srd_ray.benchmarks import run_benchmarks

    return run_benchmarks(run.spec.evaluate, evaluated_models(run), run.run_dir.stage_dir("lm_eval"))


def evaluate_model(spec: JobSpec, model_path: str, label: str) -> dict[str, Any]:
    """``srd evaluate --model``: any model folder on the spec's eval sets, into ``evaluate/<label>/``."""
    from srd_ray.evaluate import evaluate_once
    from srd_ray.spec import resolve_local_path

    if not spec.data.eval_sets:
        raise SpecError("data.eval_sets is empty: nothing to evaluate on")
    model = spec.models.student.model_copy(update={"path": resolve_local_path(model_path), "lora": None})
    check_model_path(model, "--model")
    engine = auto.engine(spec.engine.name)
    check_context(model, spec.data, spec.evaluate.generation.max_new_tokens, engine)
    eval_sets = {name: loaded.table for name, loaded in load_eval_sets(spec.data).items()}
    attach_run_log(spec.run_dir)
    ensure_ray(spec.ray, verbose=console_is_verbose())
    return evaluate_once(spec, engine, model, eval_sets, Location.of(spec.run_dir) / "evaluate" / label)


# --------------------------------------------------------------------------------------------------------
# The stage table


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # spec sections its outputs depend on (besides its upstream stages)
    upstream: tuple[str, ...]  # stages whose outputs it reads, when they are on
    outputs: str  # what its folder holds once complete (for messages)
    run: Callable[[Run], dict[str, Any]]
    off: Callable[[JobSpec], str | None] = lambda spec: None  # why the stage is off for a spec, or None
    # Extra (sections, upstream) that depend on the spec: reflect scores the teacher too with teacher_ce.
    extra: Callable[[JobSpec], tuple[tuple[str, ...], tuple[str, ...]]] = lambda spec: ((), ())

    def sections_for(self, spec: JobSpec) -> tuple[str, ...]:
        return (*self.sections, *self.extra(spec)[0])

    def upstream_for(self, spec: JobSpec) -> tuple[str, ...]:
        return (*self.upstream, *self.extra(spec)[1])


def _off_without_curriculum(spec: JobSpec) -> str | None:
    if spec.distill.curriculum == "none":
        return "distill.curriculum is none (the KD baseline trains on all rows, unranked)"
    return None


def _off_unless(condition: Callable[[JobSpec], bool], why: str) -> Callable[[JobSpec], str | None]:
    return lambda spec: None if condition(spec) else why


# The untrained student reflects; its LoRA settings (training only) do not change the scores.
_STUDENT_AS_IS = tuple(f"models.student.{key}" for key in ("path", "dtype", "trust_remote_code"))

STAGES: tuple[Stage, ...] = (
    Stage(
        "prepare", ("prepare", "run.seed"), (), "the demo data and tiny models", _prepare,
        off=_off_unless(lambda spec: bool(spec.prepare.demo_data or spec.prepare.tiny_models), "prepare makes nothing"),
    ),
    Stage(
        "teacher_sft", ("teacher_sft", "models.teacher", "run.seed", *TRAINING_DATA), ("prepare",),
        "the fine-tuned teacher", _teacher_sft,
        off=_off_unless(lambda spec: spec.teacher_sft.enabled, "teacher_sft.enabled is false"),
    ),
    Stage(
        "reflect", ("reflect", "engine", *_STUDENT_AS_IS, *TRAINING_DATA), ("prepare",), "the scored reflect shards",
        _reflect, off=_off_without_curriculum,
        extra=lambda spec: (("models.teacher",), ("teacher_sft",)) if spec.reflect.teacher_ce else ((), ()),
    ),
    Stage("rank", ("rank", "run.seed"), ("reflect",), "the rank buckets", _rank, off=_off_without_curriculum),
    # Which rows (the kept buckets, or all rows without a curriculum, plus the held-out KD rows) and how.
    Stage(
        "teacher_signal",
        ("teacher_signal", "engine", "models.teacher", "rank.keep_buckets", "rank.refresh", "distill.curriculum",
         "distill.heldout_eval_set", "distill.heldout_rows", "data.eval_sets", *TRAINING_DATA),
        ("prepare", "teacher_sft", "rank"), "the teacher's top-k signal", _teacher_signal,
        off=_off_unless(lambda spec: spec.distill.teacher_signal == "topk", "distill.teacher_signal is online"),
    ),
    Stage(
        "distill", ("distill", "models", "run.seed", *TRAINING_DATA),
        ("prepare", "teacher_sft", "rank", "teacher_signal"), "the distilled student", _distill,
        # A refresh reflects again between stages, with the reflect stage's settings.
        extra=lambda spec: (("reflect", "engine"), ()) if spec.rank.refresh == "every_stage" else ((), ()),
    ),
    Stage(
        "evaluate", ("evaluate", "engine", "models", "data.eval_sets", "data.max_prompt_tokens"),
        ("prepare", "teacher_sft", "distill"), "the evaluation summaries", _evaluate,
    ),
    Stage(
        "lm_eval", ("evaluate.lm_eval", "evaluate.models", "evaluate.num_cpus_per_actor",
                    "evaluate.num_gpus_per_actor", "models"),
        ("prepare", "teacher_sft", "distill"), "the lm-eval scores", _lm_eval,
        off=_off_unless(lambda spec: spec.evaluate.lm_eval is not None, "evaluate.lm_eval is not set"),
    ),
)  # fmt: skip
STAGE_NAMES = tuple(stage.name for stage in STAGES)
_BY_NAME = {stage.name: stage for stage in STAGES}


def enabled_stages(spec: JobSpec) -> list[str]:
    return [stage.name for stage in STAGES if stage.off(spec) is None]


def fingerprints(spec: JobSpec) -> dict[str, str]:
    result: dict[str, str] = {}
    active = set(enabled_stages(spec))
    for stage in STAGES:
        upstream = [result[name] for name in stage.upstream_for(spec) if name in active]
        result[stage.name] = spec.section_fingerprint(*stage.sections_for(spec)) + ":" + ",".join(upstream)
    return result


def check_inputs(run: Run, stage: Stage, done_before: set[str]) -> None:
    """A stage runs only once every stage it reads from is complete with these settings (or ran earlier in
    this command); else name the stage to run first."""
    active = set(enabled_stages(run.spec))
    for name in stage.upstream_for(run.spec):
        if name in active and name not in done_before and not run.run_dir.is_complete(name, run.fingerprints[name]):
            raise SpecError(
                f"{stage.name} reads {_BY_NAME[name].outputs}, which {run.run_dir.location} does not have for "
                f"this spec yet: run the {name} stage first (srd run SPEC --stages {name},{stage.name}, or without "
                "--stages)"
            )


def preflight(run: Run) -> None:
    """Check inputs before any stage output is written: data rows, model folders (and adapters, LoRA
    targets), shared tokenizer, GPUs asked for."""
    for role in ("teacher", "student"):
        check_model_path(getattr(run.spec.models, role), role)
    tokenizer = load_tokenizer(run.spec.models.student)
    check_same_tokenizer(load_tokenizer(run.spec.models.teacher), tokenizer)
    engine = run.engine
    k = run.spec.teacher_signal.k  # adaptive's max_k is only a cap
    if run.spec.distill.teacher_signal == "topk" and k != "adaptive" and k > len(tokenizer):
        raise SpecError(
            f"teacher_signal.k is {run.spec.teacher_signal.k}, more than the {len(tokenizer)} tokens of the "
            "models' vocabulary"
        )
    check_context(run.spec.models.student, run.spec.data, run.spec.reflect.generation.max_new_tokens, engine)
    check_context(run.spec.models.teacher, run.spec.data, run.spec.evaluate.generation.max_new_tokens, engine)
    _ = run.train, run.eval_sets  # load now: a bad row fails here, naming file and line
    if run.spec.distill.curriculum == "srd":
        check_stratification(run.spec.rank, run.train.table, run.train.dropped_columns, run.spec.data.train.fields.task)


def check_run_resources(run: Run) -> None:
    """Before anything is written: a vLLM pass on a GPU run asks for a GPU; on a private local Ray (whose
    one node is this machine) every stage this command runs fits. On a cluster, see :func:`_check_cluster`."""
    from srd_ray.resources import refuse_if_impossible, this_machine, vllm_without_gpu

    if run.private_ray:
        refuse_if_impossible(run.spec, list(run.stages), run.generation_engine, this_machine(run.spec))
    problem = vllm_without_gpu(run.spec, run.pass_engines())
    if problem:
        raise SpecError(problem)


def _check_cluster(run: Run) -> None:
    """Attached to a cluster: refuse now a stage that cannot fit even once its autoscaler has added every
    node it may (stages that may fit later wait for nodes when they start: :func:`_run_stage`)."""
    from srd_ray.resources import autoscaling_nodes, cluster_nodes, refuse_if_impossible

    growth = autoscaling_nodes()
    if not run.private_ray and growth is not None:
        refuse_if_impossible(run.spec, list(run.stages), run.generation_engine, cluster_nodes() + growth)


def run_pipeline(spec: JobSpec, stages: list[str] | None = None, redo: list[str] | None = None) -> dict[str, Any]:
    """Run the selected stages (default: all enabled) and return the manifest."""
    configure_driver_memory()
    selected = _selected_stages(spec, stages, redo)
    run = Run(spec, RunDirectory(spec), fingerprints(spec), tuple(stage.name for stage in selected))
    prepared = "prepare" not in enabled_stages(spec) or run.run_dir.is_complete("prepare", run.fingerprints["prepare"])
    done: set[str] = set()
    check_inputs(run, selected[0], done)
    if prepared:
        preflight(run)
    check_run_resources(run)  # needs no models: before prepare makes them
    refuse_stale_outputs(run, selected, redo)
    attach_run_log(spec.run_dir)  # the inputs passed their checks: from here on, noise goes to logs/
    if not redo and all(run.run_dir.is_complete(stage.name, run.fingerprints[stage.name]) for stage in selected):
        for stage in selected:  # a finished run: nothing needs Ray (starting one takes seconds)
            log.info("%s: already complete, skipping", stage.name)
        return run.run_dir.manifest
    ensure_ray(spec.ray, verbose=console_is_verbose())
    _check_cluster(run)
    check_every_node_sees(run.run_dir.location)
    with run.run_dir.lease():
        for name in redone_stages(redo):
            run.run_dir.redo(name)
        for stage in selected:
            check_inputs(run, stage, done)
            _run_stage(run, stage)
            hand_freed_memory_back()
            done.add(stage.name)
            if stage.name == "prepare":
                preflight(run)
    return run.run_dir.manifest


def refuse_stale_outputs(run: Run, selected: list[Stage], redo: list[str] | None) -> None:
    """Outputs of a selected stage made with other settings are refused before Ray starts and before any
    earlier stage runs: a fingerprint depends on the spec alone, so the refusal that would come when the
    stage is reached comes now (seconds, not hours, after the command). Stages being redone are exempt."""
    redone = redone_stages(redo)
    for stage in selected:
        if stage.name not in redone:
            run.run_dir.check_fingerprint(stage.name, run.fingerprints[stage.name], stage.sections_for(run.spec))


def redone_stages(redo: list[str] | None) -> list[str]:
    """``--redo`` stages and every stage after them, in pipeline order: their outputs are replaced."""
    first = min((STAGE_NAMES.index(name) for name in redo or []), default=len(STAGE_NAMES))
    return list(STAGE_NAMES[first:])


def use_the_system_allocator_for_arrow() -> None:
    """The driver's Arrow memory comes from the system allocator, which hands freed memory back; Arrow's
    default pool (mimalloc) keeps much of it, so the driver grew with every table it had read. Reading the
    training columns of 22,500 rows (6 MB live) left it 75 MB larger with mimalloc, 40 MB with the system
    pool (bench/results/arrow_pool.md). Actors keep the default: their tables come and go per shard."""
    pa.set_memory_pool(pa.system_memory_pool())


# Blocks this large or larger are mapped on their own and unmapped when freed (glibc's M_MMAP_THRESHOLD).
MMAP_THRESHOLD_BYTES = 256 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h


def configure_driver_memory() -> None:
    """The driver's allocators, set once before any stage: Arrow on the system allocator, and glibc's mmap
    threshold pinned. glibc raises that threshold as mapped blocks are freed (up to 32 MB), after which a
    stage's tables and Parquet buffers land in its heaps, and what they free there stays the driver's. The
    rank stage at 100k rows peaked 180 MB above the driver's start, 142 MB with the threshold pinned (79 MB
    of Arrow data live)."""
    use_the_system_allocator_for_arrow()
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def _glibc() -> ctypes.CDLL | None:
    """glibc, or None where the C library is another (musl, macOS): then the allocators stay as they are."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - both exist only in glibc
    except (OSError, AttributeError):
        return None
    return libc


def hand_freed_memory_back() -> None:
    """Return the driver's freed heap memory to the system (glibc's ``malloc_trim``). glibc keeps what a
    stage freed inside its heaps, in pieces between live blocks, so each stage's tables and parse buffers
    stayed part of the driver after it: 30,000 rows loaded (a 9.4 MB table) left the driver 29 MB larger,
    17 MB after a trim. In a 30k-row run the driver's peak fell by 14-44 MB per stage
    (bench/results/scale_driver_trim.md). A no-op where the C library is not glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _selected_stages(spec: JobSpec, stages: list[str] | None, redo: list[str] | None) -> list[Stage]:
    """The stages to run, in order; stages asked for that are off for this spec are named with the reason."""
    for name in [*(stages or []), *(redo or [])]:
        if name not in _BY_NAME:
            raise SpecError(f"unknown stage {name!r}; stages are {', '.join(STAGE_NAMES)}")
    asked = [_BY_NAME[name] for name in STAGE_NAMES if stages is None or name in stages]
    off = {stage.name: stage.off(spec) for stage in asked if stage.off(spec) is not None}
    for name, why in off.items():
        if stages is not None:
            log.warning("%s: off for this spec (%s), skipping", name, why)
    selected = [stage for stage in asked if stage.name not in off]
    if not selected:
        raise NothingToDo("; ".join(f"{name} is off: {why}" for name, why in off.items()))
    return selected


def _run_stage(run: Run, stage: Stage) -> None:
    fingerprint = run.fingerprints[stage.name]
    if run.run_dir.is_complete(stage.name, fingerprint):
        log.info("%s: already complete, skipping", stage.name)
        return
    check_stage(run.spec, stage.name, run.generation_engine, local=run.private_ray)
    log.info("%s: starting", stage.name)
    run.run_dir.start(stage.name, fingerprint)
    try:
        summary = stage.run(run)
    except BaseException as error:
        explained = explain(error, stage.name)
        log_traceback(error)
        run.run_dir.fail(stage.name, explained)
        if explained is error:
            raise
        raise explained from error
    run.run_dir.complete(stage.name, summary)
    log.info("%s: complete in %.1fs", stage.name, run.run_dir.stage_record(stage.name)["wall_s"])
