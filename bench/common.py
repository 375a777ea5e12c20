"""The plumbing the benchmarks share: the model pairs' settings, a base run (data prepared, teacher
fine-tuned, reference scores), compared runs' specs, running ``srd`` on a spec, reading a finished run, and
paired tables (variant - baseline of the same training seed).

Every compared run is a plain ``srd run`` of a spec written here, on its own local Ray; finished runs are
reused, so an interrupted benchmark resumes. Scripts import this as ``common`` (``bench/`` on sys.path).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_EVAL = ROOT.parent / "shared" / "data" / "eval"
RESULTS = ROOT / "bench" / "results"
# Where the benchmarks run (GPU results come from scripts/gpu-check.sh and say their card).
MACHINE = f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU"
STAGE_SETTINGS = [(0.8, 1.0), (0.9, 1.5), (1.0, 2.0)]  # the release's kd_weight / temperature per stage


def pair_settings(pair: str, cache: Path) -> dict[str, Any]:
    """The spec sections that differ between the two model pairs."""
    if pair == "tiny":
        return {
            "prepare": {
                "demo_data": {"train_rows": 800, "heldout_rows": 200, "pretrain_rows": 4000, "seed": 0},
                "tiny_models": {
                    "vocab_size": 800,
                    "teacher": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "pretrain_steps": 1000},
                    "student": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "pretrain_steps": 600},
                },
            },
            "models": {"teacher": "${run_dir}/prepare/teacher", "student": "${run_dir}/prepare/student"},
            "teacher_sft": {"epochs": 15, "lr": 2.0e-3, "batch_size": 32},
            "distill": {"batch_size": 32, "lr": 5.0e-4},
            "data": {"max_prompt_tokens": 256, "max_response_tokens": 64},
            "kd_epochs": [7, 7, 6],  # 20 epochs over all rows
            "srd_epochs": [8, 8, 8],  # over 1/4, 2/4, 3/4 of the rows: 12 epochs' worth, 0.6x
            "max_new_tokens": 32,
            "eval_rows": 100,
            "eval_seeds": [10, 20, 30],
        }
    sys.path.insert(0, str(ROOT / "bench"))
    from heal_student import healed_student
    from smollm2 import materialize, prune_layers

    teacher = materialize(cache)
    healed = pair == "smollm2_healed"  # 12 of 30 layers, healed on the original model's free text (#17 a)
    student = healed_student(cache) if healed else prune_layers(teacher, cache / "SmolLM2-6-layers", keep=6)
    return {
        # 240 training rows keep a 135M teacher + 50M student affordable on 2 CPU cores.
        "prepare": {"demo_data": {"train_rows": 240, "heldout_rows": 60, "pretrain_rows": 1, "seed": 0}},
        "models": {"teacher": str(teacher), "student": str(student)},
        "teacher_sft": {"epochs": 2, "lr": 1.0e-4, "batch_size": 8},
        "distill": {"batch_size": 8, "lr": 1.0e-4},
        "data": {"max_prompt_tokens": 256, "max_response_tokens": 32},
        # The release's 20 : 12 budget scaled down to 5 : 3 epochs (still 0.6x) to fit 2 CPU cores.
        "kd_epochs": [2, 2, 1],
        "srd_epochs": [2, 2, 2],
        "max_new_tokens": 32,
        "eval_rows": 60 if healed else 30,
        "eval_seeds": [10, 20] if healed else [10],
    }


def base_spec(settings: dict[str, Any], work: Path) -> dict[str, Any]:
    """Prepare the inputs and fine-tune the teacher once; every compared run reuses them."""
    models = settings["models"]
    sft = settings["teacher_sft"]  # None: models.teacher is already fine-tuned on these training rows
    teacher_sft = {"enabled": True, "num_workers": 1, "num_cpus_per_worker": 2, **sft} if sft else {"enabled": False}
    return {
        "run": {"name": "base", "output_dir": str(work), "seed": 0},
        "ray": {"num_cpus": 2},
        **({"prepare": settings["prepare"]} if "prepare" in settings else {}),
        "models": {"teacher": {"path": models["teacher"]}, "student": {"path": models["student"]}},
        "data": {
            "train": {"path": settings.get("train_file", "${run_dir}/prepare/demo_train.jsonl")},
            "eval_sets": settings.get("eval_files") or eval_sets(work / "base" / "prepare"),
            **settings["data"],
        },
        "teacher_sft": teacher_sft,
        "reflect": {"concurrency": 2, "batch_size": 32, "generation": {"max_new_tokens": settings["max_new_tokens"]}},
        "evaluate": {
            "seeds": settings["eval_seeds"],
            "concurrency": 2,
            "max_examples": settings["eval_rows"],
            "generation": {"temperature": 1.0, "max_new_tokens": settings["max_new_tokens"]},
        },
    }


def eval_sets(prepare_dir: Path) -> dict[str, str]:
    sets = {"demo_heldout": str(prepare_dir / "demo_heldout.jsonl")}
    sets.update({path.stem: str(path) for path in sorted(SHARED_EVAL.glob("*.jsonl"))})
    return sets


def compared_spec(base: dict[str, Any], settings: dict[str, Any], work: Path, loss: str, seed: int, curriculum: str):
    """A run on the base run's data, fine-tuned teacher and untrained student."""
    spec = json.loads(json.dumps(base))
    base_dir = work / "base"
    epochs = settings["srd_epochs"] if curriculum == "srd" else settings["kd_epochs"]
    lr = settings["distill"]["lr"]
    spec["run"] = {"name": f"{'srd' if curriculum == 'srd' else 'kd'}-{loss}-seed{seed}", "output_dir": str(work)}
    spec["run"]["seed"] = seed
    spec.pop("prepare", None)
    spec["models"]["teacher"]["path"] = teacher_of(settings, work)
    spec["models"]["student"]["path"] = spec["models"]["student"]["path"].replace("${run_dir}", str(base_dir))
    spec["data"]["train"]["path"] = spec["data"]["train"]["path"].replace("${run_dir}", str(base_dir))
    spec["teacher_sft"] = {"enabled": False}
    # These benches measure the release's global ranking; task-aware variants set rank.stratify_by.
    spec["rank"] = {**spec.get("rank", {}), "stratify_by": None}
    spec["distill"] = {
        "loss": loss,
        "curriculum": curriculum,
        "num_workers": 1,
        "num_cpus_per_worker": 2,
        "batch_size": settings["distill"]["batch_size"],
        "stages": [
            {"epochs": stage_epochs, "kd_weight": kd_weight, "temperature": temperature, "lr": lr}
            for stage_epochs, (kd_weight, temperature) in zip(epochs, STAGE_SETTINGS, strict=True)
        ],
    }
    spec["evaluate"]["models"] = ["student_after"]
    return spec


def teacher_of(settings: dict[str, Any], work: Path) -> str:
    """The task fine-tuned teacher: the base run's fine-tune, or one given as already fine-tuned."""
    if settings["teacher_sft"] is None:
        return settings["models"]["teacher"]
    return str(work / "base" / "teacher_sft" / "model")


def prepare_base(settings: dict[str, Any], work: Path) -> dict[str, Any]:
    """The base run every compared run starts from: data prepared, teacher fine-tuned, and the teacher and
    the untrained student evaluated once (a rerun skips what is done). Returns the base spec."""
    base = base_spec(settings, work)
    base_path = write_spec(base, work)
    srd("run", str(base_path), "--stages", "prepare,teacher_sft")
    for label, model in (("teacher", Path(teacher_of(settings, work))), ("student_before", None)):
        if not (work / "base" / "evaluate" / label / "summary.json").exists():
            path = model or Path(base["models"]["student"]["path"].replace("${run_dir}", str(work / "base")))
            srd("evaluate", str(base_path), "--model", str(path), "--name", label)
    return base


def srd(*args: str) -> None:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "srd_ray.cli", *args], check=True, cwd=ROOT)
    print(f"[bench] srd {' '.join(args[:2])}: {time.perf_counter() - started:.0f}s", flush=True)


def write_spec(spec: dict[str, Any], work: Path) -> Path:
    path = work / "specs" / f"{spec['run']['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def evaluated(run_dir: Path) -> bool:
    """The run got as far as evaluation. A finished run is reused as it is, even if the spec has since
    gained settings (its run.json says what made it)."""
    path = run_dir / "run.json"
    return path.exists() and json.loads(path.read_text())["stages"].get("evaluate", {}).get("status") == "complete"


def run_record(run_dir: Path) -> dict[str, Any]:
    """What the tables need from one finished run's manifest."""
    stages = json.loads((run_dir / "run.json").read_text())["stages"]
    distill = stages["distill"]["summary"]
    curation_s = sum(stages[name]["wall_s"] for name in ("reflect", "rank") if name in stages)
    scores = stages["evaluate"]["summary"]["student_after"]
    return {
        "scores": {name: result["rouge_l"] for name, result in scores.items()},
        "train_wall_s": distill["train_wall_s"],
        "distill_stage_s": stages["distill"]["wall_s"],
        "end_to_end_s": curation_s + stages["distill"]["wall_s"],
        "curation_s": curation_s,
        "optimizer_steps": distill["optimizer_steps"],
        "tokens_seen": distill["tokens_seen"],
    }


def base_scores(work: Path) -> dict[str, dict[str, float]]:
    scores = {}
    for label in ("teacher", "student_before"):
        summary = json.loads((work / "base" / "evaluate" / label / "summary.json").read_text())
        scores[label] = {name: result["rouge_l"] for name, result in summary["sets"].items()}
    return scores


def mean_of(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.fmean(run[key] for run in runs)


def mean_score(runs: list[dict[str, Any]], eval_set: str) -> float:
    return statistics.fmean(run["scores"][eval_set] for run in runs)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def record(run_dir: Path) -> dict[str, Any]:
    result = run_record(run_dir)
    result["average"] = statistics.fmean(result["scores"].values())
    return result


def paired_differences(runs: list[dict], baseline: list[dict], sets: list[str]) -> dict[str, tuple[float, float]]:
    """Per set and for the average: mean ± std over seeds of (run - baseline run of the same seed)."""
    pairs = list(zip(runs, baseline, strict=True))
    differences = {name: mean_std([r["scores"][name] - b["scores"][name] for r, b in pairs]) for name in sets}
    return differences | {"average": mean_std([r["average"] - b["average"] for r, b in pairs])}


def summarise_paired(work: Path, variants: list[str], seeds: list[int], comparisons: list[tuple[str, str]]) -> dict:
    """Over the seeds whose every variant finished (all of ``seeds`` unless a run was cut short), with the
    paired differences of each (variant, baseline) in ``comparisons``."""
    seeds = [seed for seed in seeds if all(evaluated(work / f"{variant}-seed{seed}") for variant in variants)]
    runs = {variant: [record(work / f"{variant}-seed{seed}") for seed in seeds] for variant in variants}
    return paired_summary(runs, seeds, base_scores(work), comparisons)


def paired_summary(runs: dict[str, list[dict]], seeds: list[int], reference: dict, comparisons: list) -> dict:
    """The paired tables' numbers from run records (``record``), one per seed and variant, seeds in order."""
    sets = sorted(next(iter(runs.values()))[0]["scores"])
    return {
        "machine": MACHINE,
        "seeds": seeds,
        "eval_sets": sets,
        "reference": reference,
        "runs": runs,
        "differences": [
            {"variant": v, "baseline": b, "difference": paired_differences(runs[v], runs[b], sets)}
            for v, b in comparisons
        ],
    }


def paired_markdown(results: dict[str, Any], title: str, protocol: str) -> str:
    sets = results["eval_sets"]
    lines = [
        f"# {title}", "",
        f"Machine: {results['machine']}. Protocol: {protocol}. Training seeds {results['seeds']}; ROUGE-L x100, "
        "mean ± std over training seeds.", "",
        "| variant | " + " | ".join(sets) + " | average | steps | train s | end-to-end s |",
        "|---|" + "---|" * (len(sets) + 4),
    ]  # fmt: skip
    for label, scores in results["reference"].items():
        cells = " | ".join(f"{scores[name]:.2f}" for name in sets)
        lines.append(f"| {label} | {cells} | {statistics.fmean(scores.values()):.2f} | | | |")
    for variant, runs in results["runs"].items():
        cells = [mean_std([run["scores"][name] for run in runs]) for name in sets]
        cells.append(mean_std([run["average"] for run in runs]))
        timing = [statistics.fmean(run[key] for run in runs) for key in ("train_wall_s", "end_to_end_s")]
        lines.append(f"| {variant} | " + " | ".join("{:.2f} ± {:.2f}".format(*c) for c in cells)
                     + f" | {runs[0]['optimizer_steps']} | {timing[0]:.1f} | {timing[1]:.1f} |")  # fmt: skip
    lines += ["", "Paired differences (variant - baseline of the same training seed, mean ± std over seeds):", ""]
    lines += ["| variant - baseline | " + " | ".join(sets) + " | average |", "|---|" + "---|" * (len(sets) + 1)]
    for comparison in results["differences"]:
        cells = ["{:+.2f} ± {:.2f}".format(*comparison["difference"][name]) for name in [*sets, "average"]]
        lines.append(f"| {comparison['variant']} - {comparison['baseline']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def save_results(name: str, results: Any, table: str) -> None:
    """A benchmark's results: ``bench/results/<name>.json`` (the numbers) and ``<name>.md`` (the table,
    also printed)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(table)
    print(table)
