"""One distillation step before and after the GPU-grade rework, side by side in one run.

(a) Peak memory of one micro-step (forward + backward) at 512 tokens a row (256 prompt + 256 response)
    with a 151,936-row vocabulary (Qwen2.5's), on a tiny Llama pair built here from configs: expressed in
    multiples of one fp32 logits tensor [batch, 512, 151936]. "before" is the old path (both models' full
    logits, upcast, the dense loss with its masks); "after" is ``DistillationModel``: final hidden states at
    response positions, the heads applied chunk by chunk. Each variant runs in its own process and reports
    its peak resident memory over its second step above what it held before (Linux VmHWM, reset first). The old
    path peaks near 9.5x one logits tensor, 23 GB at batch 8 on this 24 GB machine, so the side-by-side runs
    at batch 4; "after" also runs at batch 8, the target shape.
(b) Training tokens/s on the quickstart pair (teacher 128x4, student 64x2, vocab 800, 800 demo rows,
    batch 32, fkl, T 1) over the same epochs: the old loop (shuffled batches, dense loss) vs the new step
    (length-grouped plan, fused chunked loss), with the padding share of each.
(c) ``--gpu``: GPT-2 sizes (124M student, 1.5B teacher, random weights, vocab 50,257, 8 x 512 tokens) on a
    CUDA device: bf16-mixed vs fp32 tokens/s, peak memory and model FLOPs utilisation. Runs without Ray.
(d) ``--long-row``: one chat-length row, 8,192 tokens (1,024 context + 7,168 scored) at the same vocabulary:
    the chunked loss's peak against one fp32 logits tensor of that row [8192, 151936] (4.6 GiB), which is
    the bound a long row must stay under (#30).

    python bench/kd_step.py           # (a) and (b): bench/results/kd_step.{json,md}
    python bench/kd_step.py --gpu     # (c): bench/results/kd_step_gpu.{json,md}
    python bench/kd_step.py --long-row  # (d): bench/results/kd_step_long_row.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from srd_ray.spec import TrainingSpec

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
QWEN_VOCAB = 151_936
SEQ, PROMPT = 512, 256
LONG_SEQ, LONG_PROMPT = 8192, 1024
CHUNK = TrainingSpec.model_fields["loss_chunk_tokens"].default


def tiny_llama_pair(vocab: int, device: str = "cpu", positions: int = SEQ):
    from transformers import AutoModelForCausalLM, LlamaConfig

    def build(hidden: int, layers: int, seed: int):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                             num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                             max_position_embeddings=positions, tie_word_embeddings=True)  # fmt: skip
        return AutoModelForCausalLM.from_config(config).to(device)

    return build(64, 2, 1), build(128, 2, 0).eval().requires_grad_(False)


def synthetic_batch(rows: int, vocab: int, seed: int = 0, seq: int = SEQ, prompt: int = PROMPT):
    """Rows of ``prompt`` + ``seq - prompt`` response tokens (labels IGNORE_INDEX on the prompt)."""
    from srd_ray.models import TrainingExample

    generator = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(rows):
        ids = torch.randint(0, vocab, (seq,), generator=generator).tolist()
        examples.append(TrainingExample(ids, [-100] * prompt + ids[prompt:], False))
    return examples


def memory_mb() -> tuple[float, float]:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def measure_memory(variant: str, rows: int, seq: int = SEQ, prompt: int = PROMPT) -> dict:
    """Runs in its own process: peak memory of one forward + backward (the second one: the first warms up)
    above what the process held before it."""
    from srd_ray.distill.batches import MicroBatch
    from srd_ray.distill.losses import LossSettings, StageWeights, dense_loss_sums, mix
    from srd_ray.distill.parallel import Precision
    from srd_ray.distill.step import DistillationModel, StepSettings, forward_micro_batch
    from srd_ray.models import collate

    torch.set_num_threads(os.cpu_count() or 1)
    student, teacher = tiny_llama_pair(QWEN_VOCAB, positions=seq)
    examples = synthetic_batch(rows, QWEN_VOCAB, seq=seq, prompt=prompt)
    stage, loss = StageWeights(kd_weight=0.9, temperature=2.0), LossSettings("fkl")
    tokens = rows * (seq - prompt)
    if variant == "before":
        batch = collate(examples, 0)
    else:
        batch = MicroBatch.of(examples, 0)
        pair = DistillationModel(student, teacher, QWEN_VOCAB)
        settings = StepSettings(stage, loss, CHUNK, 1.0, 1)

    def micro_step() -> None:
        if variant == "before":  # the old micro-step: full logits of both models, upcast, dense loss
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            student_logits = student(**inputs).logits
            with torch.no_grad():
                teacher_logits = teacher(**inputs).logits.float()
            ce, kd = dense_loss_sums(student_logits, teacher_logits, batch["labels"], vocab_size=QWEN_VOCAB,
                                     stage=stage, settings=loss)  # fmt: skip
            mix(ce, kd, stage.kd_weight).div(tokens).backward()
        else:
            forward_micro_batch(pair, batch, settings, tokens, Precision("fp32"), torch.device("cpu")).loss.backward()
        student.zero_grad(set_to_none=True)  # as the training loop does after each optimizer step

    micro_step()  # warm-up: one-time allocations (thread pools, kernel caches) are not the step's
    baseline, _ = memory_mb()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    started = time.perf_counter()
    micro_step()
    wall = time.perf_counter() - started
    _, peak = memory_mb()
    logits_mb = rows * seq * QWEN_VOCAB * 4 / 2**20
    return {"variant": variant, "rows": rows, "tokens_per_row": seq, "scored_per_row": seq - prompt,
            "peak_over_baseline_mb": peak - baseline, "logits_tensor_mb": logits_mb,
            "x_logits": (peak - baseline) / logits_mb, "step_s": wall}  # fmt: skip


def memory_in_process(variant: str, rows: int, seq: int = SEQ, prompt: int = PROMPT) -> dict:
    """``measure_memory`` in a fresh process. A fixed mmap threshold: every large tensor is its own
    mapping, returned when freed, so resident memory follows live tensors (glibc's adaptive threshold
    otherwise keeps freed heap, run to run)."""
    output = subprocess.run(
        [sys.executable, __file__, "--measure-memory", variant, "--rows", str(rows), "--seq", str(seq),
         "--prompt", str(prompt)],
        capture_output=True, text=True, check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
    )  # fmt: skip
    result = json.loads(output.stdout.strip().splitlines()[-1])
    print(result, flush=True)
    return result


def memory_side_by_side() -> list[dict]:
    return [memory_in_process(variant, rows) for variant, rows in (("before", 4), ("after", 4), ("after", 8))]


# --------------------------------------------------------------------------------------------------------
# (b) tokens/s on the quickstart pair


def quickstart_pair(cache: Path) -> tuple[list, dict[str, str]]:
    from srd_ray.data import load_source
    from srd_ray.demo_data import write_demo_data
    from srd_ray.spec import DataSourceSpec, DataSpec, TinyModelSpec, TinyModelsSpec
    from srd_ray.tiny_models import make_tiny_models

    data_dir = cache / "demo_800"
    if not (data_dir / "demo_train.jsonl").exists():
        write_demo_data(data_dir, train_rows=800, heldout_rows=1, pretrain_rows=1, seed=0)
    data = DataSpec(train=DataSourceSpec(path=str(data_dir / "demo_train.jsonl")), max_response_tokens=64)
    table = load_source(data.train, data, label="train").table
    models_dir = cache / "quickstart_models"
    if not (models_dir / "student" / "config.json").exists():
        texts = [p + r for p, r in zip(table["prompt"].to_pylist(), table["response"].to_pylist(), strict=True)]
        spec = TinyModelsSpec(vocab_size=800, teacher=TinyModelSpec(hidden_size=128, num_layers=4, num_heads=4),
                              student=TinyModelSpec(hidden_size=64, num_layers=2, num_heads=2))  # fmt: skip
        make_tiny_models(models_dir, spec, texts, texts, seed=0)
    pairs = list(zip(table["prompt"].to_pylist(), table["response"].to_pylist(), strict=True))
    return pairs, {role: str(models_dir / role) for role in ("teacher", "student")}


def throughput(pairs: list, models: dict[str, str], variant: str, epochs: int = 2, batch_size: int = 32) -> dict:
    from srd_ray.distill.batches import BatchLayout, MicroBatch, epoch_seed, plan_epoch
    from srd_ray.distill.losses import LossSettings, StageWeights, dense_loss_sums, mix
    from srd_ray.distill.parallel import Precision
    from srd_ray.distill.step import DistillationModel, StepSettings, train_step
    from srd_ray.models import collate, encode_example, load_model, load_tokenizer
    from srd_ray.spec import ModelSpec

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = load_tokenizer(ModelSpec(path=models["student"]))
    torch.manual_seed(0)
    student = load_model(ModelSpec(path=models["student"]))
    teacher = load_model(ModelSpec(path=models["teacher"])).eval().requires_grad_(False)
    examples = [encode_example(tokenizer, p, r, 256, 64) for p, r in pairs]
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-4, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    stage, loss = StageWeights(0.8, 1.0), LossSettings("fkl")
    pad = tokenizer.pad_token_id
    tokens = positions = padding = 0
    started = time.perf_counter()
    for epoch in range(epochs):
        if variant == "before":  # the old loop: a shuffled order cut into batches, dense loss on full logits
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(epoch)).tolist()
            for start in range(0, len(order), batch_size):
                batch = collate([examples[i] for i in order[start : start + batch_size]], pad)
                inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
                step_tokens = int((batch["labels"][:, 1:] != -100).sum())
                logits = student(**inputs).logits
                with torch.no_grad():
                    teacher_logits = teacher(**inputs).logits.float()
                ce, kd = dense_loss_sums(logits, teacher_logits, batch["labels"], vocab_size=len(tokenizer),
                                         stage=stage, settings=loss)  # fmt: skip
                mix(ce, kd, stage.kd_weight).div(step_tokens).backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                tokens += step_tokens
                positions += batch["input_ids"].numel()
                padding += int((batch["attention_mask"] == 0).sum())
            continue
        pair = DistillationModel(student, teacher, len(tokenizer))
        settings = StepSettings(stage, loss, CHUNK, 1.0, 1)
        layout = BatchLayout(batch_size, 1, 1, group_by_length=True)
        lengths = [len(e.input_ids) for e in examples]
        scored = [e.scored_tokens for e in examples]
        for plan in plan_epoch(lengths, scored, layout, epoch_seed(0, 0, epoch)):
            batches = [MicroBatch.of([examples[i] for i in rows], pad) for rows in plan.micro_batches(0)]
            train_step(pair, batches, plan.num_items, optimizer=optimizer, scheduler=scheduler,
                       scaler=Precision("fp32").grad_scaler(torch.device("cpu")), settings=settings,
                       precision=Precision("fp32"), device=torch.device("cpu"))  # fmt: skip
            tokens += plan.num_items
            positions += plan.positions
            padding += plan.padding
    wall = time.perf_counter() - started
    return {"variant": variant, "epochs": epochs, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "padding_fraction": padding / positions}  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# (c) GPT-2 sizes on a GPU

H200_BF16_DENSE_FLOPS = 989.5e12  # NVIDIA H100/H200 SXM bf16 dense tensor-core peak


def gpt2_pair(device: torch.device):
    from transformers import AutoModelForCausalLM, GPT2Config

    def build(embed: int, layers: int, heads: int, dtype: torch.dtype):
        config = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=embed, n_layer=layers, n_head=heads)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=dtype)

    return build(768, 12, 12, torch.float32), build(1600, 48, 25, torch.bfloat16)


def gpu_throughput(precision_name: str, steps: int = 12, rows: int = 8) -> dict:
    from srd_ray.distill.batches import MicroBatch
    from srd_ray.distill.losses import LossSettings, StageWeights
    from srd_ray.distill.parallel import Precision, setup_device_math
    from srd_ray.distill.step import DistillationModel, StepSettings, train_step

    device = torch.device("cuda")
    setup_device_math(device)
    student, teacher = gpt2_pair(device)
    teacher = teacher.eval().requires_grad_(False)
    if precision_name == "fp32":
        teacher = teacher.float()
    pair = DistillationModel(student, teacher, 50257)
    precision = Precision(precision_name)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=True)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
    settings = StepSettings(StageWeights(0.9, 2.0), LossSettings("fkl"), CHUNK, 1.0, 1)
    batch = MicroBatch.of(synthetic_batch(rows, 50257), 0)
    tokens = rows * (SEQ - PROMPT)
    scaler = precision.grad_scaler(device)
    torch.cuda.reset_peak_memory_stats()
    timings = []
    for _ in range(steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        train_step(pair, [batch], tokens, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                   settings=settings, precision=precision, device=device)  # fmt: skip
        torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    step_s = sorted(timings[2:])[len(timings[2:]) // 2]  # median after warm-up
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    positions = rows * SEQ
    # Training FLOPs: 6 N per token for the student (forward + backward), 2 N for the teacher's forward;
    # attention scores add 12 * layers * width * seq (student, fwd+bwd) and 4 * ... (teacher, fwd).
    flops = positions * (6 * n_student + 12 * 12 * 768 * SEQ + 2 * n_teacher + 4 * 48 * 1600 * SEQ)
    return {
        "precision": precision_name, "rows": rows, "seq": SEQ, "step_s": step_s,
        "tokens_per_s": tokens / step_s, "positions_per_s": positions / step_s,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
        "mfu_vs_bf16_peak": flops / step_s / H200_BF16_DENSE_FLOPS, "device": torch.cuda.get_device_name(),
        "student_params": n_student, "teacher_params": n_teacher,
    }  # fmt: skip


def write_results(name: str, payload: dict, table: list[str]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu", action="store_true", help="(c): GPT-2 sizes on a CUDA device")
    parser.add_argument("--measure-memory", choices=["before", "after"], help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=SEQ, help=argparse.SUPPRESS)
    parser.add_argument("--prompt", type=int, default=PROMPT, help=argparse.SUPPRESS)
    parser.add_argument("--long-row", action="store_true", help="(d): one 8,192-token row")
    args = parser.parse_args()
    if args.measure_memory:
        print(json.dumps(measure_memory(args.measure_memory, args.rows, args.seq, args.prompt)))
        return
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    if args.long_row:
        run = memory_in_process("after", 1, LONG_SEQ, LONG_PROMPT)
        table = [
            f"# One chat-length row: {LONG_SEQ:,} tokens ({LONG_SEQ - LONG_PROMPT:,} scored), vocab {QWEN_VOCAB:,}", "",
            f"Machine: {machine}. Reproduce: `python bench/kd_step.py --long-row`. Tiny Llama pair (student 64x2, "
            f"teacher 128x2), fkl at T 2, loss chunk {CHUNK} tokens, fp32; peak of the second forward + backward "
            "over the set-up baseline.", "",
            "| tokens | scored | one fp32 logits tensor MB | peak over baseline MB | x logits | step s |",
            "|---|---|---|---|---|---|",
            f"| {run['tokens_per_row']} | {run['scored_per_row']} | {run['logits_tensor_mb']:.0f} | "
            f"{run['peak_over_baseline_mb']:.0f} | {run['x_logits']:.2f} | {run['step_s']:.1f} |",
        ]  # fmt: skip
        write_results("kd_step_long_row", {"machine": machine, "run": run}, table)
        return
    if args.gpu:
        runs = [gpu_throughput(name) for name in ("fp32", "bf16-mixed")]
        table = [
            "# One KD step at GPT-2 sizes (124M student, 1.5B teacher, vocab 50,257, 8 x 512 tokens)", "",
            f"Device: {runs[0]['device']}. Median step after 2 warm-up steps; MFU against 989.5 TFLOP/s bf16.", "",
            "| precision | step s | response tokens/s | positions/s | peak memory GB | MFU |",
            "|---|---|---|---|---|---|",
            *(f"| {r['precision']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['positions_per_s']:.0f} | "
              f"{r['peak_memory_gb']:.1f} | {100 * r['mfu_vs_bf16_peak']:.1f}% |" for r in runs),
        ]  # fmt: skip
        write_results("kd_step_gpu", {"runs": runs}, table)
        return
    memory = memory_side_by_side()
    pairs, models = quickstart_pair(BENCH / ".cache")
    speed = [throughput(pairs, models, variant) for variant in ("before", "after")]
    table = [
        "# One distillation step, before vs after (chunked fused loss, length-grouped micro-batches)", "",
        f"Machine: {machine}. Reproduce: `python bench/kd_step.py`.", "",
        f"## (a) Peak memory of one micro-step, 512 tokens a row (256 response), vocab {QWEN_VOCAB:,}, fp32", "",
        f"Tiny Llama pair (student 64x2, teacher 128x2); loss chunk {CHUNK} tokens. x logits = peak over the "
        "set-up baseline / one fp32 [rows, 512, vocab] tensor.", "",
        "| variant | rows | one logits tensor MB | peak over baseline MB | x logits | step s |",
        "|---|---|---|---|---|---|",
        *(f"| {m['variant']} | {m['rows']} | {m['logits_tensor_mb']:.0f} | {m['peak_over_baseline_mb']:.0f} | "
          f"{m['x_logits']:.2f} | {m['step_s']:.1f} |" for m in memory),
        "", "## (b) Training throughput on the quickstart pair (800 rows, batch 32, 2 epochs, fkl)", "",
        "| variant | response tokens | wall s | tokens/s | padding |", "|---|---|---|---|---|",
        *(f"| {s['variant']} | {s['tokens']} | {s['wall_s']:.1f} | {s['tokens_per_s']:.0f} | "
          f"{100 * s['padding_fraction']:.1f}% |" for s in speed),
        "", f"after / before tokens/s: {speed[1]['tokens_per_s'] / speed[0]['tokens_per_s']:.2f}x",
    ]  # fmt: skip
    write_results("kd_step", {"machine": machine, "memory": memory, "throughput": speed}, table)


if __name__ == "__main__":
    main()
