"""Distill throughput: a plain single-process PyTorch KD loop vs the Ray Train job with 1 and 2 workers.

All three run the same optimizer steps on the same rows (two epochs of the demo training split, global
batch 16: the 2-worker job uses 8 rows per worker), the same small teacher (hidden 256, 4 layers) and
student (hidden 128, 2 layers), forward KL with kd_weight 0.9 at T = 1, in one run on this machine.

- ``plain loop``: one process, torch on every core, the same loss code (``micro_batch_sums``);
- ``ray train xN``: ``run_training`` (TorchTrainer, gloo DDP for N = 2) with N workers sharing the cores.

Two figures per config: tokens/s over the whole call (worker start-up, model loading and the end-of-stage
checkpoint included) and steady-state tokens/s (the mean of the logged per-window rates).

    python bench/distill_throughput.py        # results: bench/results/distill_throughput.{json,md}
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

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
    import torch

    from srd_ray.distill.train import LossSettings, micro_batch_sums
    from srd_ray.models import IGNORE_INDEX, collate, encode_example, load_model, load_tokenizer
    from srd_ray.spec import ModelSpec

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    tokenizer = load_tokenizer(ModelSpec(path=models["student"]))
    student = load_model(ModelSpec(path=models["student"])).train()
    teacher = load_model(ModelSpec(path=models["teacher"])).eval().requires_grad_(False)
    examples = [
        encode_example(tokenizer, p, r, data_spec.max_prompt_tokens, data_spec.max_response_tokens)
        for p, r in zip(train["prompt"].to_pylist(), train["response"].to_pylist(), strict=True)
    ]
    generator = torch.Generator().manual_seed(0)
    order = [i for _ in range(stage.epochs) for i in torch.randperm(len(examples), generator=generator).tolist()]
    optimizer = torch.optim.AdamW(student.parameters(), lr=stage.lr, weight_decay=0.01)
    loss = LossSettings("fkl")
    tokens, step_rates = 0, []
    for start in range(0, len(order), GLOBAL_BATCH):
        step_started = time.perf_counter()
        batch = collate([examples[i] for i in order[start : start + GLOBAL_BATCH]], tokenizer.pad_token_id)
        step_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        sums = micro_batch_sums(logits, teacher_logits, batch["labels"], vocab_size=len(tokenizer),
                                temperature=stage.temperature, loss=loss)  # fmt: skip
        ((1 - stage.kd_weight) * sums.ce + stage.kd_weight * sums.kd).div(step_tokens).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += step_tokens
        step_rates.append(step_tokens / (time.perf_counter() - step_started))
    wall = time.perf_counter() - started
    return {"wall_s": wall, "tokens": tokens, "steps": -(-len(order) // GLOBAL_BATCH),
            "steady_tokens_per_s": statistics.fmean(step_rates)}  # fmt: skip


def ray_train(train, models, data_spec, stage, workers: int, out: Path) -> dict:
    import ray

    from srd_ray.distill.train import LossSettings, StagePlan, run_training
    from srd_ray.spec import ModelSpec, TrainingSpec

    training = TrainingSpec(
        num_workers=workers, num_cpus_per_worker=(os.cpu_count() or 1) / workers,
        batch_size=GLOBAL_BATCH // workers, log_every_steps=10,
    )  # fmt: skip
    stage_dir = out / f"workers_{workers}"
    started = time.perf_counter()
    summary = run_training(
        name=f"bench_{workers}", training=training, data=data_spec, student=ModelSpec(path=models["student"]),
        teacher=ModelSpec(path=models["teacher"]), plan=[StagePlan(0, ("all",), stage)],
        datasets={"all": ray.data.from_arrow(train.select(["example_id", "prompt", "response"]))},
        loss=LossSettings("fkl"), seed=0, stage_dir=stage_dir,
    )  # fmt: skip
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
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distill_throughput.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    table = [
        f"# Distill throughput: {train.num_rows} rows x {stage.epochs} epochs, global batch {GLOBAL_BATCH}",
        "",
        f"Machine: {machine}. Whole-call figures include worker start-up, model loading and the final checkpoint.",
        "",
        "| config | steps | tokens | wall s | tokens/s | x plain | steady tokens/s | steady x plain |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    (RESULTS / "distill_throughput.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
