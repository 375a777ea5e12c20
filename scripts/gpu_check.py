"""The GPU check: the parts of training that run without Ray, on a CUDA device (see gpu-check.sh).

1. the step core under NCCL at world size 1: ``Trainer`` with a ``LocalHost`` over two curriculum stages,
   checkpointed, killed after a mid-stage checkpoint and resumed (per-step losses compared);
   FSDP2 ``fully_shard`` with a bf16 ``MixedPrecisionPolicy`` on the same pair;
2. bf16-mixed training lowers the loss;
3. the chunked loss equals the unchunked one on CUDA (fp32, TF32 off), every divergence, T 1 and 2;
4. benchmark (c): ``bench/kd_step.py --gpu`` (GPT-2 sizes, bf16-mixed vs fp32);
5. the transformers engine generating and scoring on CUDA.

Each check prints one ``CHECK <name>: ok|FAILED ...`` line; everything is also written to
``$OUT/gpu_check.json``. Without a GPU it runs on the CPU with gloo (a dry run of the script itself).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from srd_ray.demo_data import write_demo_data  # noqa: E402
from srd_ray.distill.batches import MicroBatch  # noqa: E402
from srd_ray.distill.losses import (  # noqa: E402
    IGNORE_INDEX,
    KD_LOSS_NAMES,
    DenseTeacher,
    Head,
    LossSettings,
    ScoredPositions,
    StageWeights,
    dense_loss_sums,
    distillation_loss,
    gather_scored,
)
from srd_ray.distill.parallel import Precision, shard  # noqa: E402
from srd_ray.distill.step import DistillationModel, StepSettings, train_step  # noqa: E402
from srd_ray.distill.worker import LocalHost, StagePlan, Trainer, TrainingJob  # noqa: E402
from srd_ray.engines import TransformersEngine  # noqa: E402
from srd_ray.models import encode_example, load_model, load_tokenizer  # noqa: E402
from srd_ray.spec import (  # noqa: E402
    DataSourceSpec,
    DataSpec,
    GenerationSpec,
    ModelSpec,
    StageSpec,
    StudentModelSpec,
    TeacherModelSpec,
    TinyModelSpec,
    TinyModelsSpec,
    TrainingSpec,
)
from srd_ray.tiny_models import make_tiny_models  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
OUT = Path(os.environ.get("OUT", tempfile.mkdtemp(prefix="gpu-check-")))
results: dict[str, dict] = {}


def run_check(name: str, fn, *args) -> None:
    """One check: ``CHECK name: ok {details}`` or ``CHECK name: FAILED reason`` (the next check still runs)."""
    started = time.perf_counter()
    try:
        details = fn(*args) or {}
        results[name] = {"ok": True, **details}
        print(f"CHECK {name}: ok {json.dumps(details)}", flush=True)
    except Exception as error:
        results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        print(f"CHECK {name}: FAILED {type(error).__name__}: {error}", flush=True)
        traceback.print_exc()
    results[name]["seconds"] = round(time.perf_counter() - started, 1)


def setup() -> tuple[dict, list[dict]]:
    work = Path(tempfile.mkdtemp(prefix="gpu-check-work-"))
    demo = write_demo_data(work / "demo", train_rows=64, heldout_rows=8, pretrain_rows=200, seed=0)
    rows = [json.loads(line) for line in Path(demo["train"]).read_text().splitlines()]
    texts = [r["prompt"] + r["output"] for r in rows]
    spec = TinyModelsSpec(vocab_size=400, teacher=TinyModelSpec(hidden_size=128, num_layers=2, num_heads=4),
                          student=TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2))  # fmt: skip
    models = make_tiny_models(work / "models", spec, texts, texts, seed=0)
    training_rows = [{"example_id": f"row-{i}", "prompt": r["prompt"], "response": r["output"]} for i, r in
                     enumerate(rows)]  # fmt: skip
    return models, training_rows


def job(models: dict, out: Path, precision: str, **training) -> TrainingJob:
    plan = (StagePlan(0, ("all",), StageSpec(steps=6, kd_weight=0.8, temperature=1.0, lr=2e-3)),
            StagePlan(1, ("all",), StageSpec(steps=8, kd_weight=0.9, temperature=2.0, lr=2e-3)))  # fmt: skip
    settings = {"num_workers": 1, "use_gpu": CUDA, "batch_size": 8, "log_every_steps": 1, "precision": precision,
                **training}  # fmt: skip
    return TrainingJob(
        name="gpu-check", training=TrainingSpec(**settings), data=DataSpec(train=DataSourceSpec(path="unused"),
        max_response_tokens=48), student=StudentModelSpec(path=models["student"]),
        teacher=TeacherModelSpec(path=models["teacher"]), plan=plan, loss=LossSettings("fkl"), seed=0,
        metrics_path=str(out / "metrics.jsonl"),
    )  # fmt: skip


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["global_step"]: r["loss"] for r in records if "event" not in r}


class Killed(Exception):
    pass


class KilledAt(LocalHost):
    def report(self, metrics, folder):
        super().report(metrics, folder)
        if folder is not None and metrics["global_step"] == 9:
            raise Killed


def step_core_resumes(models: dict, rows: list[dict]) -> dict:
    """Two stages under NCCL at world size 1, killed after the checkpoint at step 9 and resumed."""
    straight, killed = OUT / "straight", OUT / "killed"
    Trainer(job(models, straight, "fp32"), LocalHost({"all": rows}, straight / "ck", DEVICE)).run()
    resumable = job(models, killed, "fp32", checkpoint_every_steps=3)
    with contextlib.suppress(Killed):
        Trainer(resumable, KilledAt({"all": rows}, killed / "ck", DEVICE)).run()
    Trainer(resumable, LocalHost({"all": rows}, killed / "ck", DEVICE)).run()
    a, b = losses(straight), losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 15)), (sorted(a), sorted(b))
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
    assert worst < 1e-4, f"resumed losses differ by {worst:.2e} (relative)"
    return {"steps": len(a), "max_relative_loss_difference_after_resume": worst, "first": a[1], "last": a[14]}


def bf16_lowers_the_loss(models: dict, rows: list[dict]) -> dict:
    out = OUT / "bf16"
    Trainer(job(models, out, "bf16-mixed"), LocalHost({"all": rows}, out / "ck", DEVICE)).run()
    values = losses(out)
    first, last = sum(values[s] for s in (1, 2, 3)) / 3, sum(values[s] for s in (12, 13, 14)) / 3
    assert last < first, values
    return {"first_3_mean": first, "last_3_mean": last}


def fsdp2_bf16_policy(models: dict, rows: list[dict]) -> dict:
    """FSDP2 with a bf16 MixedPrecisionPolicy on the pair (world size 1: sharding is a no-op, the policy not)."""
    student = load_model(ModelSpec(path=models["student"]), DEVICE)
    teacher = load_model(ModelSpec(path=models["teacher"]), DEVICE).eval().requires_grad_(False)
    tokenizer = load_tokenizer(ModelSpec(path=models["student"]))
    pair = DistillationModel(student, teacher, len(tokenizer))
    precision = Precision("bf16-mixed")
    shard(pair, [student, teacher], precision)
    examples = [encode_example(tokenizer, r["prompt"], r["response"], 256, 48) for r in rows[:8]]
    batch = MicroBatch.of(examples, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in pair.parameters() if p.requires_grad], lr=2e-3)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    settings = StepSettings(StageWeights(0.8, 1.0), LossSettings("fkl"), 64, 1.0, 1)
    values = []
    for _ in range(5):
        result = train_step(pair, [batch], int(batch.scored.targets.numel()), optimizer=optimizer,
                            scheduler=scheduler, scaler=precision.grad_scaler(DEVICE), settings=settings,
                            precision=precision, device=DEVICE)  # fmt: skip
        values.append(float(result.ce_sum + result.kd_sum))
    assert values[-1] < values[0], values
    return {"loss_sums": values}


def chunked_equals_unchunked() -> dict:
    """Every divergence at T 1 and 2, GPT-2's vocabulary with a padded head, fp32 with TF32 off."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    vocab, width = 50257, 96
    labels = torch.randint(0, vocab, (4, 40))
    labels[:, :12] = IGNORE_INDEX
    labels[2, 30:] = IGNORE_INDEX
    hidden, teacher_hidden = torch.randn(4, 40, width, device=DEVICE), torch.randn(4, 40, width, device=DEVICE)
    weight = (torch.randn(vocab + 63, width, device=DEVICE) * 0.1).requires_grad_()
    teacher_weight = torch.randn(vocab + 63, width, device=DEVICE) * 0.1
    tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    positions = ScoredPositions.of(labels).to(DEVICE)
    teacher = DenseTeacher(Head(teacher_weight, None, vocab), gather_scored(teacher_hidden, positions))
    worst = 0.0
    for name in KD_LOSS_NAMES:
        for temperature in (1.0, 2.0):
            stage, settings = StageWeights(0.7, temperature), LossSettings(name)
            ce, kd = dense_loss_sums(hidden @ weight.T, teacher_hidden @ teacher_weight.T, labels.to(DEVICE),
                                     vocab_size=vocab, stage=stage, settings=settings)  # fmt: skip
            dense = ((1 - stage.kd_weight) * ce + stage.kd_weight * kd) / tokens
            dense.backward()
            dense_grad, weight.grad = weight.grad.clone(), None
            chunked = distillation_loss(gather_scored(hidden, positions), Head(weight, None, vocab), teacher,
                                        positions.targets, stage=stage, settings=settings,
                                        num_items_in_batch=tokens, chunk_tokens=32)  # fmt: skip
            chunked.loss.backward()
            grad_error = float((weight.grad - dense_grad).abs().max() / dense_grad.abs().max())
            weight.grad = None
            worst = max(worst, abs(chunked.loss.item() - dense.item()) / abs(dense.item()), grad_error)
    torch.backends.cuda.matmul.allow_tf32 = True
    assert worst < 1e-5, f"relative difference {worst:.2e}"
    return {"max_relative_difference": worst}


def engine_generates(models: dict, rows: list[dict]) -> dict:
    data = DataSpec(train=DataSourceSpec(path="unused"), max_response_tokens=48)
    engine = TransformersEngine(ModelSpec(path=models["teacher"]), data, max_new_tokens=24, num_gpus=1 if CUDA else 0)
    assert engine.device.type == DEVICE.type
    prompts = [r["prompt"] for r in rows[:16]]
    answers = engine.generate(prompts, GenerationSpec(temperature=1.0, max_new_tokens=24), list(range(16)))
    ce = engine.response_cross_entropy(prompts, [r["response"] for r in rows[:16]])
    assert len(answers.texts) == 16 and all(t > 0 for t in answers.generated_tokens)
    return {"generated_tokens": sum(answers.generated_tokens), "mean_ce": sum(ce.mean) / 16,
            "sample": answers.texts[0][:80]}  # fmt: skip


def gpt2_size_benchmark() -> dict:
    sys.path.insert(0, str(ROOT / "bench"))
    import kd_step

    runs = [kd_step.gpu_throughput(name) for name in ("fp32", "bf16-mixed")]
    for run in runs:
        print(json.dumps(run), flush=True)
    return {"runs": runs}


def main() -> int:
    print(f"device: {torch.cuda.get_device_name() if CUDA else 'CPU (no GPU: dry run)'}; torch {torch.__version__}")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    dist.init_process_group("nccl" if CUDA else "gloo", rank=0, world_size=1)
    models, rows = setup()
    run_check("step_core_nccl_world1_resume", step_core_resumes, models, rows)
    run_check("bf16_mixed_lowers_the_loss", bf16_lowers_the_loss, models, rows)
    run_check("fsdp2_bf16_policy_world1", fsdp2_bf16_policy, models, rows)
    run_check("chunked_equals_unchunked_on_device", chunked_equals_unchunked)
    run_check("transformers_engine_generates", engine_generates, models, rows)
    if CUDA:
        run_check("benchmark_c_gpt2_sizes", gpt2_size_benchmark)
    (OUT / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    dist.destroy_process_group()
    failed = [name for name, result in results.items() if not result["ok"]]
    print(f"gpu check: {len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
