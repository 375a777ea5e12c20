"""Curriculum training on Ray Train: the student (and, for teacher SFT, the teacher) is trained stage by
stage on Ray Data datasets pulled from the object store.

Per step: ``loss = (1 − kd_weight)·CE(student, reference) + kd_weight·KD_T(teacher ‖ student)``, summed
over response tokens and divided by the response-token count of the whole optimizer step across
gradient-accumulation micro-batches and workers, in fp32.

A stage trains on the union of its datasets (for SRD, buckets 0..s), reshuffled each epoch with a seed
derived from (run seed, stage, epoch, worker). Every worker follows the same schedule and takes the same
number of steps, because Ray Train's ``report`` and DDP's all-reduce are barriers. A checkpoint (student in
save_pretrained format + optimizer, scheduler, position) is reported at every epoch end; a restarted or
rerun job continues from the last one.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from srd_ray import storage
from srd_ray.distill.losses import token_kd
from srd_ray.distill.parallel import (
    full_model_state,
    full_optimizer_state,
    gradient_sync,
    load_optimizer_state,
    shard_model,
    unwrap,
)
from srd_ray.models import (
    IGNORE_INDEX,
    TrainingExample,
    check_same_tokenizer,
    collate,
    encode_example,
    load_model,
    load_tokenizer,
    shift_for_next_token,
)
from srd_ray.spec import DataSpec, DistillSpec, ModelSpec, StageSpec, TrainingSpec
from srd_ray.storage import Location, Place

log = logging.getLogger(__name__)

TRAINING_STATE = "training_state.pt"


@dataclass(frozen=True)
class StagePlan:
    """What one curriculum stage trains on, and how."""

    index: int
    datasets: tuple[str, ...]
    settings: StageSpec


@dataclass(frozen=True)
class LossSettings:
    name: str
    temperature_scaling: str = "t_squared"
    jsd_beta: float = 0.9
    skew_alpha: float = 0.1

    @classmethod
    def from_spec(cls, spec: DistillSpec) -> LossSettings:
        return cls(spec.loss, spec.temperature_scaling, spec.jsd_beta, spec.skew_alpha)


def bucket_name(bucket: int) -> str:
    return f"bucket_{bucket}"


def plan_curriculum(spec: DistillSpec) -> list[StagePlan]:
    """SRD: stage s trains on buckets 0..s. none: every stage trains on all rows (the matched baseline)."""
    if spec.curriculum == "none":
        return [StagePlan(i, ("all",), stage) for i, stage in enumerate(spec.stages)]
    return [StagePlan(i, tuple(bucket_name(b) for b in range(i + 1)), stage) for i, stage in enumerate(spec.stages)]


@dataclass
class StepSums:
    """Loss sums over the response tokens of one micro-batch (divide by a token count to get means)."""

    ce: torch.Tensor
    kd: torch.Tensor
    tokens: int


def micro_batch_sums(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float,
    loss: LossSettings,
) -> StepSums:
    """CE and KD summed over response tokens. Logits are cut to the tokenizer's vocabulary first: padded
    heads (e.g. 152064 vs 151936 rows) carry no real tokens."""
    student_logits, labels = shift_for_next_token(student_logits[..., :vocab_size].float(), labels)
    mask = labels != IGNORE_INDEX
    ce = F.cross_entropy(
        student_logits.reshape(-1, vocab_size), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if teacher_logits is None:
        kd = student_logits.new_zeros(())
    else:
        teacher_logits = teacher_logits[:, :-1, :vocab_size]
        per_token = token_kd(
            loss.name,
            student_logits,
            teacher_logits,
            temperature=temperature,
            temperature_scaling=loss.temperature_scaling,
            jsd_beta=loss.jsd_beta,
            skew_alpha=loss.skew_alpha,
        )
        kd = torch.where(mask, per_token, torch.zeros_like(per_token)).sum()
    return StepSums(ce=ce, kd=kd, tokens=int(mask.sum()))


def _all_reduce(value: float, *, minimum: bool = False) -> float:
    """Sum (or minimum) of ``value`` over all workers; the value itself when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN if minimum else dist.ReduceOp.SUM)
    return float(tensor.item())


def _epoch_order(n: int, seed: int, stage: int, epoch: int, rank: int) -> list[int]:
    generator = torch.Generator().manual_seed(((seed * 1009 + stage) * 1009 + epoch) * 1009 + rank)
    return torch.randperm(n, generator=generator).tolist()


@dataclass(frozen=True)
class StageLayout:
    """One stage's rows on this worker and its step counts (identical on every worker)."""

    pool: list[TrainingExample]
    usable: int  # rows per worker per epoch: the minimum over workers, so step counts match
    steps_per_epoch: int
    total_steps: int


def layout_stage(pool: list[TrainingExample], settings: StageSpec, training: TrainingSpec, index: int) -> StageLayout:
    usable = int(_all_reduce(len(pool), minimum=True))
    if usable == 0:
        raise ValueError(f"stage {index} has no training rows on some worker")
    steps_per_epoch = math.ceil(math.ceil(usable / training.batch_size) / training.gradient_accumulation_steps)
    return StageLayout(pool, usable, steps_per_epoch, settings.steps or steps_per_epoch * settings.epochs)


def resolve_teacher_dtype(choice: str, spec: ModelSpec, device: torch.device) -> ModelSpec:
    if choice == "auto":
        choice = "bfloat16" if device.type == "cuda" else spec.dtype
    return spec.model_copy(update={"dtype": choice})


@torch.no_grad()
def heldout_kd_loss(
    model: torch.nn.Module,
    teacher: torch.nn.Module,
    examples: list[TrainingExample],
    *,
    pad_token_id: int,
    vocab_size: int,
    loss: LossSettings,
    device: torch.device,
    batch_size: int,
) -> float:
    """Token-mean KD loss (T = 1, no T² factor) of the student on held-out rows: did distillation work?"""
    measure = LossSettings("fkl" if loss.name == "sft" else loss.name, "none", loss.jsd_beta, loss.skew_alpha)
    was_training = model.training
    model.eval()
    kd, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        sums = micro_batch_sums(
            model(**inputs).logits, teacher(**inputs).logits.float(), batch["labels"],
            vocab_size=vocab_size, temperature=1.0, loss=measure,
        )  # fmt: skip
        kd, tokens = kd + sums.kd.item(), tokens + sums.tokens
    model.train(was_training)
    return kd / max(tokens, 1)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch

    training = TrainingSpec.model_validate(config["training"])
    data = DataSpec.model_validate(config["data"])
    student_spec = ModelSpec.model_validate(config["student"])
    teacher_spec = ModelSpec.model_validate(config["teacher"]) if config["teacher"] else None
    plan = [
        StagePlan(p["index"], tuple(p["datasets"]), StageSpec.model_validate(p["settings"])) for p in config["plan"]
    ]
    loss = LossSettings(**config["loss"])
    seed = config["seed"]
    continuous = not config["reset_optimizer_each_stage"]
    metrics_path = Location.of(config["metrics_path"])

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if training.use_gpu else torch.device("cpu")
    torch.manual_seed(seed + rank)

    tokenizer = load_tokenizer(student_spec)
    vocab_size = len(tokenizer)
    resume = _load_resume_state(ray.train.get_checkpoint())
    start_from = student_spec
    if resume is not None:
        start_from = student_spec.model_copy(update={"path": resume["model_dir"]})
    student = load_model(start_from, device)
    teacher = None
    if teacher_spec is not None:
        check_same_tokenizer(load_tokenizer(teacher_spec), tokenizer)
        teacher_spec = resolve_teacher_dtype(config["teacher_dtype"], teacher_spec, device)
        teacher = load_model(teacher_spec, device).eval().requires_grad_(False)
    heads = {"student": student.config.vocab_size, "teacher": teacher.config.vocab_size if teacher else vocab_size}
    if min(heads.values()) < vocab_size:
        raise ValueError(f"tokenizer has {vocab_size} tokens but a model head has fewer: {heads}")
    if rank == 0 and max(heads.values()) > vocab_size:
        log.info("logits cut to the tokenizer's %d tokens (padded heads: %s)", vocab_size, heads)
    model = shard_model(student, training.strategy, world)
    if rank == 0:
        log.info("%s over %d worker(s) on %s", training.strategy, world, device)
    if teacher is not None and training.strategy == "fsdp":
        teacher = shard_model(teacher, "fsdp", world)

    examples: dict[str, list[TrainingExample]] = {}

    def pool_of(stage: StagePlan) -> list[TrainingExample]:
        # Each bucket is pulled from the object store once, when its first stage starts, then reused.
        for name in stage.datasets:
            if name not in examples:
                shard = ray.train.get_dataset_shard(name)
                examples[name] = [
                    encode_example(tokenizer, row["prompt"], row["response"], data.max_prompt_tokens,
                                   data.max_response_tokens)
                    for row in shard.iter_rows()
                ]  # fmt: skip
        return [example for name in stage.datasets for example in examples[name]]

    heldout = [
        encode_example(tokenizer, prompt, response, data.max_prompt_tokens, data.max_response_tokens)
        for prompt, response in config["heldout"]
    ]

    def record_heldout(after_stage: int) -> None:
        if teacher is None or not heldout:
            return
        value = heldout_kd_loss(
            model, teacher, heldout, pad_token_id=tokenizer.pad_token_id, vocab_size=vocab_size, loss=loss,
            device=device, batch_size=training.batch_size,
        )  # fmt: skip
        if rank == 0:
            _append_metrics(metrics_path, {"event": "heldout", "after_stage": after_stage, "heldout_kd": value})

    def new_optimizer(lr: float, total_steps: int) -> tuple[Any, Any]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=training.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps, eta_min=training.min_lr)
        return optimizer, scheduler

    layouts: dict[int, StageLayout] = {}
    if continuous:  # one schedule over every stage needs every stage's step count up front
        layouts = {stage.index: layout_stage(pool_of(stage), stage.settings, training, stage.index) for stage in plan}
        optimizer, scheduler = new_optimizer(plan[0].settings.lr, sum(x.total_steps for x in layouts.values()))

    latest_metrics: dict[str, Any] = {}  # the last logged losses ride along with each checkpoint report
    global_step = resume["global_step"] if resume else 0
    tokens_seen = resume["tokens_seen"] if resume else 0
    if resume is None:
        record_heldout(after_stage=-1)

    def checkpoint(stage: int, stage_step: int) -> None:
        """Report a checkpoint that resumes at optimizer step ``stage_step`` of ``stage``."""
        _report_checkpoint(
            rank=rank, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
            strategy=training.strategy, latest_metrics=latest_metrics,
            state={"stage": stage, "stage_step": stage_step, "global_step": global_step, "tokens_seen": tokens_seen,
                   "rng": torch.get_rng_state()},
        )  # fmt: skip

    for stage in plan:
        if resume and stage.index < resume["stage"]:
            continue
        settings = stage.settings
        layout = layouts.get(stage.index) or layout_stage(pool_of(stage), settings, training, stage.index)
        if not continuous:
            optimizer, scheduler = new_optimizer(settings.lr, layout.total_steps)
        first_step = 0
        if resume and stage.index == resume["stage"]:
            if continuous or resume["stage_step"] > 0:  # else: a fresh stage with a fresh optimizer
                load_optimizer_state(model, optimizer, resume["optimizer"], training.strategy)
                scheduler.load_state_dict(resume["scheduler"])
            torch.set_rng_state(resume["rng"])
            first_step = resume["stage_step"]
        resume = None
        if rank == 0:
            log.info(
                "stage %d: %d rows per worker x %d workers from %s, %d steps (%d per epoch), kd_weight %.2f, T %.2f",
                stage.index, layout.usable, world, ",".join(stage.datasets), layout.total_steps,
                layout.steps_per_epoch, settings.kd_weight, settings.temperature,
            )  # fmt: skip
        accumulation = training.gradient_accumulation_steps
        window_started, window_tokens = time.perf_counter(), 0.0
        step_groups: list[list[list[int]]] = []
        for stage_step in range(first_step, layout.total_steps):
            epoch, step_in_epoch = divmod(stage_step, layout.steps_per_epoch)
            if step_in_epoch == 0 or not step_groups:
                order = _epoch_order(len(layout.pool), seed, stage.index, epoch, rank)[: layout.usable]
                batches = [order[i : i + training.batch_size] for i in range(0, layout.usable, training.batch_size)]
                step_groups = [batches[i : i + accumulation] for i in range(0, len(batches), accumulation)]
            step_batches = [
                collate([layout.pool[i] for i in batch], tokenizer.pad_token_id) for batch in step_groups[step_in_epoch]
            ]
            step_tokens = _all_reduce(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in step_batches))
            ce_sum = kd_sum = 0.0
            model.train()
            for position, batch in enumerate(step_batches):
                batch = {k: v.to(device) for k, v in batch.items()}
                student_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                teacher_logits = None
                if teacher is not None and settings.kd_weight > 0:
                    with torch.no_grad():
                        teacher_logits = teacher(
                            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                        ).logits.float()
                sums = micro_batch_sums(
                    student_logits, teacher_logits, batch["labels"],
                    vocab_size=vocab_size, temperature=settings.temperature, loss=loss,
                )  # fmt: skip
                # DDP averages gradients over workers; multiplying by `world` turns that into a sum,
                # so the step's gradient is the global token mean.
                total = ((1 - settings.kd_weight) * sums.ce + settings.kd_weight * sums.kd) * world / step_tokens
                is_last = position == len(step_batches) - 1
                with gradient_sync(model, enabled=is_last):
                    total.backward()
                ce_sum += sums.ce.item()
                kd_sum += sums.kd.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), training.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            tokens_seen += int(step_tokens)
            window_tokens += step_tokens
            if global_step % training.log_every_steps == 0:
                ce_mean = _all_reduce(ce_sum) / step_tokens
                kd_mean = _all_reduce(kd_sum) / step_tokens
                elapsed = time.perf_counter() - window_started
                metrics = {
                    "stage": stage.index, "epoch": epoch, "global_step": global_step,
                    "ce": ce_mean, "kd": kd_mean,
                    "loss": (1 - settings.kd_weight) * ce_mean + settings.kd_weight * kd_mean,
                    "lr": scheduler.get_last_lr()[0], "tokens_seen": tokens_seen,
                    "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                }  # fmt: skip
                window_started, window_tokens = time.perf_counter(), 0.0
                latest_metrics = {k: metrics[k] for k in ("loss", "ce", "kd", "lr", "tokens_per_s")}
                if rank == 0:
                    # Metrics go to a JSON-lines file and the log; ray.train.report only on request: in
                    # Ray Train 2.60 each report is a ~2 s barrier, which would dominate small steps.
                    _append_metrics(metrics_path, metrics)
                if training.report_every_log_step:
                    ray.train.report(metrics)  # every rank, every log step: report is a barrier
            last_of_stage = stage_step + 1 == layout.total_steps  # the stage-end checkpoint follows
            if (
                training.checkpoint_every_steps
                and global_step % training.checkpoint_every_steps == 0
                and not last_of_stage
            ):
                checkpoint(stage.index, stage_step + 1)
        record_heldout(after_stage=stage.index)
        checkpoint(stage.index + 1, 0)


def _append_metrics(path: Location, metrics: dict[str, Any]) -> None:
    storage.append_line(path, json.dumps(metrics))
    if metrics.get("event") == "heldout":
        log.info("held-out KD loss after stage %d: %.4f", metrics["after_stage"], metrics["heldout_kd"])
        return
    log.info(
        "stage %d epoch %d step %d: loss %.4f (ce %.4f, kd %.4f), lr %.2e, %.0f tokens/s",
        metrics["stage"], metrics["epoch"], metrics["global_step"], metrics["loss"], metrics["ce"],
        metrics["kd"], metrics["lr"], metrics["tokens_per_s"],
    )  # fmt: skip


def _report_checkpoint(
    *,
    rank: int,
    model: Any,
    tokenizer: Any,
    optimizer: Any,
    scheduler: Any,
    state: dict,
    strategy: str,
    latest_metrics: dict[str, float],
) -> None:
    import ray.train

    # Under FSDP gathering the full weights and optimizer state is collective: every rank joins.
    weights = full_model_state(model, strategy)
    optimizer_state = full_optimizer_state(model, optimizer, strategy)
    metrics = {**{k: v for k, v in state.items() if k != "rng"}, **latest_metrics, "checkpoint": True}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as scratch:
        unwrap(model).save_pretrained(scratch, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        torch.save(
            {**state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict()},
            Path(scratch) / TRAINING_STATE,
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(scratch))


def _load_resume_state(checkpoint: Any) -> dict[str, Any] | None:
    if checkpoint is None:
        return None
    # Copy out of Ray's checkpoint folder: the model is loaded from it after this function returns.
    local = Path(tempfile.mkdtemp(prefix="srd-resume-"))
    with checkpoint.as_directory() as folder:
        shutil.copytree(folder, local, dirs_exist_ok=True)
    state = torch.load(local / TRAINING_STATE, weights_only=False)
    state["model_dir"] = str(local)
    log.info("resuming at stage %d, step %d of the stage", state["stage"], state["stage_step"])
    return state


# --------------------------------------------------------------------------------------------------------
# Driver


def run_training(
    *,
    name: str,
    training: TrainingSpec,
    data: DataSpec,
    student: ModelSpec,
    teacher: ModelSpec | None,
    plan: list[StagePlan],
    datasets: dict[str, Any],
    loss: LossSettings,
    seed: int,
    stage_dir: Place,
    reset_optimizer_each_stage: bool = True,
    teacher_dtype: str = "auto",
    heldout: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """Train with Ray Train and save the final model to ``stage_dir/model`` (atomically).

    Rerunning with the same ``stage_dir`` resumes from the last reported checkpoint."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    stage_dir = Location.of(stage_dir)
    resources = {"CPU": training.num_cpus_per_worker}
    if training.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "training": training.model_dump(mode="json", include=set(TrainingSpec.model_fields)),
            "data": data.model_dump(mode="json"),
            "student": student.model_dump(mode="json"),
            "teacher": teacher.model_dump(mode="json") if teacher else None,
            "plan": [
                {"index": p.index, "datasets": list(p.datasets), "settings": p.settings.model_dump()} for p in plan
            ],
            "loss": loss.__dict__,
            "seed": seed,
            "reset_optimizer_each_stage": reset_optimizer_each_stage,
            "teacher_dtype": teacher_dtype,
            "heldout": heldout or [],
            "metrics_path": str(stage_dir / "metrics.jsonl"),
        },
        scaling_config=ScalingConfig(
            num_workers=training.num_workers, use_gpu=training.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            # Checkpoints go straight to the run directory's filesystem (local disk or object store).
            storage_path=(stage_dir / "ray_train").path,
            storage_filesystem=stage_dir.filesystem,
            failure_config=FailureConfig(max_failures=2),
        ),
        datasets=datasets,
    )
    started = time.perf_counter()
    sigint_handler = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    except SystemExit:
        # Ray Train handles Ctrl-C itself: it aborts the workers and exits. To srd it is an interruption
        # like any other (the stage is marked failed; a rerun resumes from the last checkpoint).
        raise KeyboardInterrupt(f"{name} interrupted") from None
    finally:
        # fit() leaves Ray's handler installed, which would turn a later Ctrl-C into a clean exit.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint_handler)
    wall = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training finished without a checkpoint")
    final = result.metrics or {}
    if final.get("stage") != len(plan):
        # An aborted run also returns a result; only the checkpoint taken after the last stage is the end.
        raise KeyboardInterrupt(f"{name} stopped at stage {final.get('stage')} before its last stage ended")
    with result.checkpoint.as_directory() as folder, storage.directory(stage_dir / "model") as scratch:
        for item in Path(folder).iterdir():
            if item.name != TRAINING_STATE:
                shutil.copy2(item, scratch / item.name)
    return {
        "train_wall_s": round(wall, 2),
        "optimizer_steps": final.get("global_step"),
        "tokens_seen": final.get("tokens_seen"),
        "model": str(stage_dir / "model"),
        "stages": _stage_losses(stage_dir),
        "heldout_kd": _heldout_losses(stage_dir),
    }


def _read_metrics(path: Location) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _heldout_losses(stage_dir: Location) -> list[dict[str, Any]]:
    """Held-out KD loss before training (after_stage -1) and after each stage (the last record wins)."""
    latest = {r["after_stage"]: r["heldout_kd"] for r in _read_metrics(stage_dir / "metrics.jsonl") if "event" in r}
    return [{"after_stage": stage, "heldout_kd": value} for stage, value in sorted(latest.items())]


def _stage_losses(stage_dir: Location) -> list[dict[str, Any]]:
    """Per stage: first and last logged losses (from metrics.jsonl)."""
    path = stage_dir / "metrics.jsonl"
    by_step: dict[int, dict] = {}
    for record in _read_metrics(path):
        if "event" not in record:
            by_step[record["global_step"]] = record  # a restarted worker group may log a step twice
    stages: dict[int, list[dict]] = {}
    for record in sorted(by_step.values(), key=lambda r: r["global_step"]):
        stages.setdefault(record["stage"], []).append(record)
    return [
        {"stage": stage, "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
         "last_ce": records[-1]["ce"], "last_kd": records[-1]["kd"]}
        for stage, records in sorted(stages.items())
    ]  # fmt: skip
