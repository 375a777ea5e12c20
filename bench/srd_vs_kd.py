"""SRD vs plain KD: the same KD job with and without the curriculum, several losses and seeds.

Two model pairs:

- ``tiny``: the quickstart's demo data and tiny Llama pair (teacher fine-tuned on the task first).
- ``smollm2``: SmolLM2-135M-Instruct as the teacher (fine-tuned on the demo task first) and a student
  made from it by keeping 6 of its 30 layers (``bench/smollm2.py``), so the two share a tokenizer.

For each loss and training seed two runs share every input and setting but the curriculum:

- ``kd``: ``curriculum: none``, all rows for 20 epochs (7 + 7 + 6 over the three stages),
- ``srd``: ``curriculum: srd``, 8 epochs per stage over buckets {0}, {0,1}, {0,1,2} of 4
  = 8 x (1/4 + 1/2 + 3/4) = 12 epochs of data, 0.6x the baseline's passes (the SRD release's budget).
  The smollm2 pair scales this to 5 (2 + 2 + 1) vs 3 (2 per stage) epochs, the same 0.6x.

Both use the same per-stage kd_weight / temperature / lr, so the only difference is which rows are
trained on when. The shared inputs (demo data, tiny models, the fine-tuned teacher) are made once in a
``base`` run that also evaluates the teacher and the untrained student. Every run is a plain
``srd run`` of a spec written here, on its own local Ray.

Reported: ROUGE-L x100 of the distilled student on the demo held-out split and on the real eval sets
in ../shared/data/eval (mean over eval seeds, then mean ± std over training seeds), the distill stage's
training wall time, and the end-to-end time (SRD: reflect + rank + distill; KD: distill), with SRD / KD
ratios. Results go to bench/results/srd_vs_kd_<pair>.{json,md}.

    python bench/srd_vs_kd.py --pair tiny                    # 2 losses x 3 seeds x 2 runs, ~25 min on 2 cores
    python bench/srd_vs_kd.py --pair smollm2 --seeds 0       # ~45 min on 2 cores
"""

from __future__ import annotations

import argparse
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
    print(f"[srd_vs_kd] srd {' '.join(args[:2])}: {time.perf_counter() - started:.0f}s", flush=True)


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


def markdown(pair: str, results: dict[str, Any]) -> str:
    sets = results["eval_sets"]
    header = "| model | " + " | ".join(sets) + " | average | train s | end-to-end s | steps | tokens |"
    lines = [
        f"# SRD vs plain KD: {pair} pair",
        "",
        f"Machine: {results['machine']}. Training seeds {results['seeds']}; each score is ROUGE-L x100 "
        f"averaged over eval seeds {results['eval_seeds']} ({results['eval_rows']} examples per set, the "
        "demo's held-out split and ../shared/data/eval), then mean ± std over training seeds. "
        f"KD = curriculum: none, epochs {results['kd_epochs']} over all rows; SRD = epochs "
        f"{results['srd_epochs']} over 1/4, 2/4, 3/4 of the rows (easy to hard, hardest quarter dropped): "
        "0.6x the passes. Same kd_weight/temperature/lr per stage. "
        "End-to-end: SRD includes reflect + rank; the teacher fine-tune (shared) is excluded.",
        "",
        header,
        "|---|" + "---|" * (len(sets) + 5),
    ]
    for label, scores in results["reference"].items():
        cells = [f"{scores[name]:.2f}" for name in sets]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {statistics.fmean(scores.values()):.2f} | | | | |")
    for loss, methods in results["losses"].items():
        for method in ("kd", "srd"):
            runs = methods[method]
            cells = []
            for name in [*sets, "average"]:
                mean, std = mean_std([run["scores"][name] if name != "average" else run["average"] for run in runs])
                cells.append(f"{mean:.2f} ± {std:.2f}")
            timings = [statistics.fmean(run[key] for run in runs) for key in ("train_wall_s", "end_to_end_s")]
            counts = [runs[0]["optimizer_steps"], runs[0]["tokens_seen"]]
            lines.append(
                f"| {method.upper()} {loss} | " + " | ".join(cells)
                + f" | {timings[0]:.1f} | {timings[1]:.1f} | {counts[0]} | {counts[1]} |"
            )  # fmt: skip
        ratios = methods["srd_over_kd"]
        lines.append(
            f"| SRD / KD {loss} | " + " | ".join(f"{ratios['scores'][name]:+.2f}" for name in sets)
            + f" | {ratios['average_difference']:+.2f} | {ratios['train_wall']:.2f}x | {ratios['end_to_end']:.2f}x"
            f" | {ratios['optimizer_steps']:.2f}x | {ratios['tokens_seen']:.2f}x |"
        )  # fmt: skip
    lines += ["", "SRD / KD rows: score columns are differences in ROUGE-L points (SRD minus KD); others ratios."]
    return "\n".join(lines) + "\n"


def summarise(pair: str, work: Path, losses: list[str], seeds: list[int], settings: dict[str, Any]) -> dict:
    results: dict[str, Any] = {
        "pair": pair,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "seeds": seeds,
        "eval_seeds": settings["eval_seeds"],
        "eval_rows": settings["eval_rows"],
        "kd_epochs": settings["kd_epochs"],
        "srd_epochs": settings["srd_epochs"],
        "reference": base_scores(work),
        "losses": {},
    }
    results["eval_sets"] = sorted(results["reference"]["teacher"])
    for loss in losses:
        methods: dict[str, Any] = {}
        for method in ("kd", "srd"):
            runs = []
            for seed in seeds:
                record = run_record(work / f"{method}-{loss}-seed{seed}")
                record["average"] = statistics.fmean(record["scores"].values())
                runs.append(record)
            methods[method] = runs
        kd, srd = methods["kd"], methods["srd"]
        methods["srd_over_kd"] = {
            "scores": {name: mean_score(srd, name) - mean_score(kd, name) for name in results["eval_sets"]},
            "average_difference": mean_of(srd, "average") - mean_of(kd, "average"),
            "train_wall": mean_of(srd, "train_wall_s") / mean_of(kd, "train_wall_s"),
            "end_to_end": mean_of(srd, "end_to_end_s") / mean_of(kd, "end_to_end_s"),
            "optimizer_steps": mean_of(srd, "optimizer_steps") / mean_of(kd, "optimizer_steps"),
            "tokens_seen": mean_of(srd, "tokens_seen") / mean_of(kd, "tokens_seen"),
        }
        results["losses"][loss] = methods
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--losses", default="fkl,rkl", help="comma-separated KD losses")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--work-dir", type=Path, help="run directories (default bench/.cache/srd_vs_kd/<pair>)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    losses, seeds = args.losses.split(","), [int(seed) for seed in args.seeds.split(",")]
    work = (args.work_dir or ROOT / "bench" / ".cache" / "srd_vs_kd" / args.pair).resolve()
    settings = pair_settings(args.pair, ROOT / "bench" / ".cache")

    # Reruns skip finished runs (the run directory's manifest), so an interrupted experiment continues.
    base = prepare_base(settings, work)
    for loss in losses:
        for seed in seeds:
            for curriculum in ("none", "srd"):
                srd("run", str(write_spec(compared_spec(base, settings, work, loss, seed, curriculum), work)))

    results = summarise(args.pair, work, losses, seeds, settings)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"srd_vs_kd_{args.pair}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(args.pair, results)
    (RESULTS / f"srd_vs_kd_{args.pair}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
