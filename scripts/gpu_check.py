"""The GPU check: the parts of training that run without Ray, on a CUDA device (see gpu-check.sh).

1. the step core under NCCL at world size 1: ``Trainer`` with a ``LocalHost`` over two curriculum stages,
   checkpointed, killed after a mid-stage checkpoint and resumed (per-step losses compared);
2. bf16-mixed training lowers the loss;
3. FSDP2 at world size 1 through the ``Trainer``: bf16-mixed, the teacher in bf16 as its own FSDP root
   (released after each micro-batch), killed and resumed;
4. a LoRA student under FSDP sampling in the worker (``student_generation.mode: on``, engine transformers)
   and training on its samples, killed and resumed: the first forward after the resume is ``generate``'s;
5. the chunked loss equals the unchunked one on CUDA (fp32, TF32 off), every divergence, T 1 and 2; and in
   bf16-mixed against the fp32 reference;
6. the teacher pass at k 1024 on CUDA (transformers engine, tempered tails), its shards arriving in pieces
   and written whole by the pass's writer (as when Ray Data splits an oversized block);
7. benchmark (c): ``bench/kd_step.py --gpu`` (GPT-2 sizes, bf16-mixed vs fp32);
8. the transformers engine generating and scoring on CUDA.

No Ray and no vLLM: the script blocks both imports, so a dry run here proves it needs neither.

Each check prints one ``CHECK <name>: ok|FAILED ...`` line; everything is also written to
``$OUT/gpu_check.json``. Without a GPU it runs on the CPU with gloo (a dry run of the script itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
for absent in ("ray", "vllm"):  # the GPU machine has neither: fail here, in the dry run, if one is needed
    sys.modules[absent] = None  # type: ignore[assignment]

from srd_ray.demo_data import write_demo_data  # noqa: E402
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
from srd_ray.distill.step import FrozenTeacher  # noqa: E402
from srd_ray.distill.worker import LocalHost, StagePlan, Trainer, TrainingJob  # noqa: E402
from srd_ray.engines import TransformersEngine  # noqa: E402
from srd_ray.models import load_model  # noqa: E402
from srd_ray.spec import (  # noqa: E402
    DataSourceSpec,
    DataSpec,
    DistillSpec,
    GenerationSpec,
    LoraSpec,
    ModelSpec,
    StageSpec,
    StudentModelSpec,
    TeacherModelSpec,
    TinyModelSpec,
    TinyModelsSpec,
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


def job(models: dict, out: Path, precision: str, lora: LoraSpec | None = None, **training) -> TrainingJob:
    plan = (StagePlan(0, ("all",), StageSpec(steps=6, kd_weight=0.8, temperature=1.0, lr=2e-3)),
            StagePlan(1, ("all",), StageSpec(steps=8, kd_weight=0.9, temperature=2.0, lr=2e-3)))  # fmt: skip
    settings = {"num_workers": 1, "use_gpu": CUDA, "batch_size": 8, "log_every_steps": 1, "precision": precision,
                **training}  # fmt: skip
    return TrainingJob(
        name="gpu-check", training=DistillSpec(**settings), data=DataSpec(train=DataSourceSpec(path="unused"),
        max_response_tokens=48), student=StudentModelSpec(path=models["student"], lora=lora),
        teacher=TeacherModelSpec(path=models["teacher"]), plan=plan, loss=LossSettings("fkl"), seed=0,
        metrics_path=str(out / "metrics.jsonl"),
    )  # fmt: skip


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["global_step"]: r["loss"] for r in records if "event" not in r}


class Killed(Exception):
    pass


class KilledAt(LocalHost):
    def __init__(self, datasets, checkpoints, device, kill_step: int) -> None:
        super().__init__(datasets, checkpoints, device)
        self.kill_step = kill_step

    def report(self, metrics, folder):
        super().report(metrics, folder)
        if folder is not None and metrics["global_step"] == self.kill_step:
            raise Killed


def logging_to(training_job: TrainingJob, out: Path) -> TrainingJob:
    return dataclasses.replace(training_job, metrics_path=str(out / "metrics.jsonl"))


def killed_and_resumed(name: str, training_job: TrainingJob, rows: list[dict], kill_step: int) -> dict[int, float]:
    """Run ``training_job`` straight, then again killed after its checkpoint at ``kill_step`` and resumed;
    returns the resumed run's per-step losses after checking that they match the straight run's."""
    straight, killed = OUT / f"{name}-straight", OUT / f"{name}-killed"
    Trainer(logging_to(training_job, straight), LocalHost({"all": rows}, straight / "ck", DEVICE)).run()
    resumable = logging_to(training_job, killed)
    with contextlib.suppress(Killed):
        Trainer(resumable, KilledAt({"all": rows}, killed / "ck", DEVICE, kill_step)).run()
    Trainer(resumable, LocalHost({"all": rows}, killed / "ck", DEVICE)).run()
    a, b = losses(straight), losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 15)), (sorted(a), sorted(b))
    return b | {"worst": max(abs(a[s] - b[s]) / abs(a[s]) for s in a)}


def step_core_resumes(models: dict, rows: list[dict]) -> dict:
    """Two stages under NCCL at world size 1, killed after the checkpoint at step 9 and resumed."""
    result = killed_and_resumed("ddp", job(models, OUT, "fp32", checkpoint_every_steps=3), rows, kill_step=9)
    assert result["worst"] < 1e-4, f"resumed losses differ by {result['worst']:.2e} (relative)"
    return {"steps": 14, "max_relative_loss_difference_after_resume": result["worst"], "first": result[1],
            "last": result[14]}  # fmt: skip


def bf16_lowers_the_loss(models: dict, rows: list[dict]) -> dict:
    out = OUT / "bf16"
    Trainer(job(models, out, "bf16-mixed"), LocalHost({"all": rows}, out / "ck", DEVICE)).run()
    values = losses(out)
    first, last = sum(values[s] for s in (1, 2, 3)) / 3, sum(values[s] for s in (12, 13, 14)) / 3
    assert last < first, values
    return {"first_3_mean": first, "last_3_mean": last}


def fsdp_world1_bf16_teacher_root(models: dict, rows: list[dict]) -> dict:
    """FSDP2 at one worker through the Trainer: bf16-mixed, the teacher (bf16 on CUDA) its own FSDP root,
    released after each micro-batch; killed after step 9 and resumed (GPU atomics and TF32: close, not equal)."""
    from torch.distributed.tensor import DTensor

    training_job = job(models, OUT, "bf16-mixed", strategy="fsdp", checkpoint_every_steps=3)
    result = killed_and_resumed("fsdp", training_job, rows, kill_step=9)
    trainer = Trainer(training_job, LocalHost({"all": rows}, OUT / "fsdp-probe" / "ck", DEVICE))
    trainer.setup()
    teacher = trainer.model.teacher
    assert isinstance(teacher, FrozenTeacher) and {p.dtype for p in teacher.parameters()} == {
        torch.bfloat16 if CUDA else torch.float32
    }
    assert isinstance(teacher.lm.get_output_embeddings().weight, DTensor), "teacher root resharded after use"
    assert result["worst"] < 2e-2, f"resumed losses differ by {result['worst']:.2e} (relative)"
    return {"max_relative_loss_difference_after_resume": result["worst"], "first": result[1], "last": result[14]}


def lora_sampling_after_resume(models: dict, rows: list[dict]) -> dict:
    """A LoRA student under FSDP samples in the worker every step (mode on) and trains on its samples; killed
    after step 9, the resumed run's first forward is generate's (review F2)."""
    generation = {"mode": "on", "engine": "transformers"}
    training_job = job(models, OUT, "bf16-mixed", lora=LoraSpec(r=8, alpha=16), strategy="fsdp",
                       checkpoint_every_steps=3, student_generation=generation)  # fmt: skip
    result = killed_and_resumed("lora-on", training_job, rows, kill_step=9)
    values = [result[s] for s in range(1, 15)]
    assert all(torch.isfinite(torch.tensor(values))), values
    return {"losses": values, "max_relative_loss_difference_after_resume": result["worst"]}


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


def chunked_loss_in_bf16() -> dict:
    """The fused chunked loss under bf16 autocast against the fp32 dense reference: the loss within 2 %, the
    head gradient pointing the same way (cosine > 0.99)."""
    torch.manual_seed(0)
    vocab, width = 50257, 96
    labels = torch.randint(0, vocab, (4, 40))
    labels[:, :12] = IGNORE_INDEX
    hidden, teacher_hidden = torch.randn(4, 40, width, device=DEVICE), torch.randn(4, 40, width, device=DEVICE)
    weight = (torch.randn(vocab, width, device=DEVICE) * 0.1).requires_grad_()
    teacher_weight = torch.randn(vocab, width, device=DEVICE) * 0.1
    tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    positions = ScoredPositions.of(labels).to(DEVICE)
    teacher = DenseTeacher(Head(teacher_weight, None, vocab), gather_scored(teacher_hidden, positions))
    stage, settings = StageWeights(0.9, 2.0), LossSettings("fkl")
    ce, kd = dense_loss_sums(hidden @ weight.T, teacher_hidden @ teacher_weight.T, labels.to(DEVICE),
                             vocab_size=vocab, stage=stage, settings=settings)  # fmt: skip
    dense = ((1 - stage.kd_weight) * ce + stage.kd_weight * kd) / tokens
    dense.backward()
    reference, weight.grad = weight.grad.clone(), None
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        chunked = distillation_loss(gather_scored(hidden, positions), Head(weight, None, vocab), teacher,
                                    positions.targets, stage=stage, settings=settings, num_items_in_batch=tokens,
                                    chunk_tokens=32)  # fmt: skip
    chunked.loss.backward()
    relative = abs(chunked.loss.item() - dense.item()) / abs(dense.item())
    cosine = float(torch.nn.functional.cosine_similarity(weight.grad.flatten(), reference.flatten(), dim=0))
    assert relative < 2e-2 and cosine > 0.99, (relative, cosine)
    return {"relative_loss_difference": relative, "head_gradient_cosine": cosine}


def widened_teacher(teacher: str, vocab_size: int) -> Path:
    """The teacher with its tokenizer and embeddings widened to ``vocab_size`` by tokens no text contains:
    the demo text supports too few BPE tokens for a top 1024."""
    from transformers import AutoTokenizer

    out = OUT / f"teacher-{vocab_size}"
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.add_tokens([f"<unused_{i}>" for i in range(vocab_size - len(tokenizer))])
    model = load_model(ModelSpec(path=teacher))
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def teacher_pass_k1024_whole_shards(models: dict, rows: list[dict]) -> dict:
    """The teacher pass at k 1024 with the stored tempered tails (T 1.5, 2) on the device; each shard's
    scored rows reach the pass's writer in pieces, as Ray Data delivers a block over its size limit, and are
    written once, whole."""
    import pyarrow as pa

    from srd_ray.shards import ShardedPass, ShardEngine, ShardWriter, split_into_shards
    from srd_ray.storage import Location
    from srd_ray.teacher_signal import SETTINGS_KEY, score_signal, signal_fields

    data = DataSpec(train=DataSourceSpec(path="unused"), max_response_tokens=48)
    engine = TransformersEngine(ModelSpec(path=str(widened_teacher(models["teacher"], 2048))), data,
                                max_new_tokens=1, num_gpus=1 if CUDA else 0)  # fmt: skip
    table = pa.Table.from_pylist([{**row, "input_position": i} for i, row in enumerate(rows)])
    shards = split_into_shards(table, 32)
    sharded = ShardedPass("teacher_signal", Location.of(OUT / "signal"), SETTINGS_KEY, {"k": 1024})
    columns = pa.schema(signal_fields("float16"))
    scorer = ShardEngine("teacher_signal", lambda batch: score_signal(batch, engine, 1024, "float16", (1.5, 2.0)),
                         engine.row_errors, "error")  # fmt: skip
    writer = ShardWriter(sharded, lambda scored: scored, lambda _: columns, "num_tokens",
                         shard_sizes={shard["shard_index"][0].as_py(): shard.num_rows for shard in shards})  # fmt: skip
    written = []
    for shard in shards:
        scored = scorer(shard)
        for start in range(0, scored.num_rows, 11):  # three pieces a shard
            written += writer(scored.slice(start, 11)).to_pylist()
    assert [w["shard_index"] for w in written] == [0, 1], written
    signal = sharded.read(columns=["example_id", "num_tokens", "topk_ids"])
    assert sorted(signal["example_id"].to_pylist()) == sorted(r["example_id"] for r in rows)
    widths = {len(ids) // count for ids, count in zip(signal["topk_ids"].to_pylist(), signal["num_tokens"].to_pylist(),
                                                       strict=True)}  # fmt: skip
    assert widths == {1024}, widths
    stored = sum(info.size for info in sharded.shards_dir.files())
    return {"rows": signal.num_rows, "response_tokens": sum(w["tokens"] for w in written), "stored_bytes": stored}


def adaptive_topk_on_device() -> dict:
    """k adaptive on the device keeps the same ids per token as on the CPU, at a 49k vocabulary (SmolLM2's)
    and max_k 1024: the per-token cut is a cumulative sum in fp32, which kernels may order differently,
    so counts may differ by one where a token's mass sits on the coverage; nowhere else."""
    from srd_ray.engines import topk_of

    torch.manual_seed(0)
    # Zipf-shaped rows of varied steepness, as an LM's: some tokens keep a few ids, some hit max_k.
    ranks = torch.log(torch.arange(1, 49153, dtype=torch.float32))
    steepness = torch.linspace(2.0, 8.0, 256)[:, None]
    logits = -steepness * ranks[torch.argsort(torch.rand(256, 49152), dim=-1)] + 0.3 * torch.randn(256, 49152)
    on_cpu = topk_of(logits, 1024, (1.5, 2.0), coverage=0.99)
    on_device = [t.cpu() for t in topk_of(logits.to(DEVICE), 1024, (1.5, 2.0), coverage=0.99)]
    differ = (on_cpu[4] != on_device[4]).sum().item()
    assert differ <= 2 and on_cpu[4].min() >= 1, differ
    same = on_cpu[4] == on_device[4]
    torch.testing.assert_close(on_device[2][same], on_cpu[2][same], rtol=1e-3, atol=1e-4)  # tails
    return {"mean_ids_per_token": on_cpu[4].float().mean().item(), "counts_differ": differ}


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
    run_check("fsdp_world1_bf16_teacher_root_resume", fsdp_world1_bf16_teacher_root, models, rows)
    run_check("lora_fsdp_in_worker_sampling_after_resume", lora_sampling_after_resume, models, rows)
    run_check("chunked_equals_unchunked_on_device", chunked_equals_unchunked)
    run_check("chunked_loss_in_bf16", chunked_loss_in_bf16)
    run_check("teacher_pass_k1024_whole_shards", teacher_pass_k1024_whole_shards, models, rows)
    run_check("transformers_engine_generates", engine_generates, models, rows)
    run_check("adaptive_topk_on_device", adaptive_topk_on_device)
    if CUDA:
        run_check("benchmark_c_gpt2_sizes", gpt2_size_benchmark)
    (OUT / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    dist.destroy_process_group()
    failed = [name for name, result in results.items() if not result["ok"]]
    print(f"gpu check: {len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
