"""Distill throughput: a plain single-process PyTorch KD loop vs the Ray Train job with 1 and 2 workers.

All three run the same optimizer steps on the same rows (two epochs of the demo training split, global
batch 16: the 2-worker job uses 8 rows per worker), the same small teacher (hidden 256, 4 layers) and
student (hidden 128, 2 layers), forward KL with kd_weight 0.9 at T = 1, in one run on this machine.

- ``plain loop``: one process, torch on every core, the same step code (``plan_epoch`` + ``train_step``);
- ``ray train xN``: ``run_training`` (TorchTrainer, gloo DDP for N = 2) with N workers sharing the cores.

Two figures per config: tokens/s over the whole call (worker start-up, model loading and the end-of-stage
checkpoint included) and steady-state tokens/s (the mean of the logged per-window rates).

    python bench/distill_throughput.py        # results: bench/results/distill_throughput.{json,md}
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import MACHINE

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
GLOBAL_BATCH = 16


def prepare(cache: Path) -> tuple[str, dict[str, str]]:
    from srd_ray.demo_data import write_demo_data
    from srd_ray.spec import TinyModelSpec, TinyModelsSpec
    from srd_ray.tiny_models import make_tiny_models

    data_dir = cache / "demo_1200"
    if not (data_dir / "demo_train.jsonl").exists():
        write_demo_data(data_dir, train_rows=1200, heldout_rows=1, pretrain_rows=1200, seed=0)
    models_dir = cache / "distill_models_256_128"
    if not (models_dir / "student" / "config.json").exists():
        rows = [json.loads(line) for line in (data_dir / "demo_train.jsonl").read_text().splitlines()]
        texts = [r["prompt"] + r["output"] for r in rows]
        spec = TinyModelsSpec(
            teacher=TinyModelSpec(hidden_size=256, num_layers=4, num_heads=8),
            student=TinyModelSpec(hidden_size=128, num_layers=2, num_heads=4),
        )
        make_tiny_models(models_dir, spec, texts, texts, seed=0)
    return str(data_dir / "demo_train.jsonl"), {r: str(models_dir / r) for r in ("teacher", "student")}


def plain_loop(train, models, data_spec, stage) -> dict:
    """The same steps as one Ray Train worker would take, in this process: ``plan_epoch`` + ``train_step``."""
    import torch

    from srd_ray.distill.batches import BatchLayout, MicroBatch, epoch_seed, plan_epoch
    from srd_ray.distill.losses import LossSettings, StageWeights
    from srd_ray.distill.parallel import Precision
    from srd_ray.distill.step import DistillationModel, StepSettings, train_step
    from srd_ray.models import encode_example, load_model, load_tokenizer
    from srd_ray.spec import ModelSpec, TrainingSpec

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    tokenizer = load_tokenizer(ModelSpec(path=models["student"]))
    student = load_model(ModelSpec(path=models["student"]))
    teacher = load_model(ModelSpec(path=models["teacher"])).eval().requires_grad_(False)
    pair = DistillationModel(student, teacher, len(tokenizer))
    examples = [
        encode_example(tokenizer, p, r, data_spec.max_prompt_tokens, data_spec.max_response_tokens)
        for p, r in zip(train["prompt"].to_pylist(), train["response"].to_pylist(), strict=True)
    ]
    lengths = [len(e.input_ids) for e in examples]
    scored = [e.scored_tokens for e in examples]
    optimizer = torch.optim.AdamW(student.parameters(), lr=stage.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    chunk = TrainingSpec.model_fields["loss_chunk_tokens"].default
    settings = StepSettings(StageWeights(stage.kd_weight, stage.temperature), LossSettings("fkl"), chunk, 1.0, 1)
    precision, cpu = Precision("fp32"), torch.device("cpu")
    scaler = precision.grad_scaler(cpu)
    tokens, steps, step_rates = 0, 0, []
    for epoch in range(stage.epochs):
        for plan in plan_epoch(lengths, scored, BatchLayout(GLOBAL_BATCH, 1, 1), epoch_seed(0, 0, epoch)):
            step_started = time.perf_counter()
            batches = [MicroBatch.of([examples[i] for i in rows], tokenizer.pad_token_id) for rows in
                       plan.micro_batches(0)]  # fmt: skip
            train_step(pair, batches, plan.num_items, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                       settings=settings, precision=precision, device=cpu)  # fmt: skip
            tokens, steps = tokens + plan.num_items, steps + 1
            step_rates.append(plan.num_items / (time.perf_counter() - step_started))
    wall = time.perf_counter() - started
    return {"wall_s": wall, "tokens": tokens, "steps": steps, "steady_tokens_per_s": statistics.fmean(step_rates)}


def ray_train(train, models, data_spec, stage, workers: int, out: Path) -> dict:

    from srd_ray.distill.driver import run_training
    from srd_ray.distill.losses import LossSettings
    from srd_ray.distill.worker import StagePlan, TrainingJob
    from srd_ray.spec import StudentModelSpec, TeacherModelSpec, TrainingSpec

    training = TrainingSpec(
        num_workers=workers, num_cpus_per_worker=(os.cpu_count() or 1) / workers,
        batch_size=GLOBAL_BATCH // workers, log_every_steps=10,
    )  # fmt: skip
    stage_dir = out / f"workers_{workers}"
    job = TrainingJob(
        name=f"bench_{workers}", training=training, data=data_spec, student=StudentModelSpec(path=models["student"]),
        teacher=TeacherModelSpec(path=models["teacher"]), plan=(StagePlan(0, ("all",), stage),),
        loss=LossSettings("fkl"), seed=0, metrics_path=str(stage_dir / "metrics.jsonl"),
    )  # fmt: skip
    started = time.perf_counter()
    summary = run_training(job, {"all": train.select(["example_id", "prompt", "response"])}, stage_dir)
    wall = time.perf_counter() - started
    rates = [json.loads(line)["tokens_per_s"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()
             if "tokens_per_s" in line]  # fmt: skip
    return {"wall_s": wall, "tokens": summary["tokens_seen"], "steps": summary["optimizer_steps"],
            "steady_tokens_per_s": statistics.fmean(rates[1:] or rates)}  # fmt: skip


def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from srd_ray.data import load_source
    from srd_ray.pipeline import ensure_ray
    from srd_ray.spec import DataSourceSpec, DataSpec, RaySpec, StageSpec

    train_path, models = prepare(BENCH / ".cache")
    data_spec = DataSpec(train=DataSourceSpec(path=train_path))
    train = load_source(data_spec.train, data_spec, label="train").table
    stage = StageSpec(epochs=2, kd_weight=0.9, temperature=1.0, lr=1e-3)

    results = {"plain loop (1 process)": plain_loop(train, models, data_spec, stage)}
    print(results)
    ensure_ray(RaySpec(num_cpus=os.cpu_count(), object_store_memory_mb=512))
    with tempfile.TemporaryDirectory() as out:
        for workers in (1, 2):
            results[f"ray train x{workers} worker(s)"] = ray_train(train, models, data_spec, stage, workers, Path(out))
            print(results)
    base = results["plain loop (1 process)"]
    rows = []
    for name, r in results.items():
        r["tokens_per_s"] = r["tokens"] / r["wall_s"]
        r["x_plain"] = r["tokens_per_s"] / (base["tokens"] / base["wall_s"])
        r["steady_x_plain"] = r["steady_tokens_per_s"] / base["steady_tokens_per_s"]
        rows.append(
            f"| {name} | {r['steps']} | {r['tokens']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['x_plain']:.2f} | {r['steady_tokens_per_s']:.0f} | {r['steady_x_plain']:.2f} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distill_throughput.json").write_text(json.dumps({"machine": MACHINE, "results": results}, indent=2))
    table = [
        f"# Distill throughput: {train.num_rows} rows x {stage.epochs} epochs, global batch {GLOBAL_BATCH}",
        "",
        f"Machine: {MACHINE}. Whole-call figures include worker start-up, model loading and the final checkpoint.",
        "",
        "| config | steps | tokens | wall s | tokens/s | x plain | steady tokens/s | steady x plain |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    (RESULTS / "distill_throughput.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
