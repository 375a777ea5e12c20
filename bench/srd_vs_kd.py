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
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    MACHINE,
    ROOT,
    base_scores,
    compared_spec,
    mean_of,
    mean_score,
    mean_std,
    pair_settings,
    prepare_base,
    run_record,
    save_results,
    srd,
    write_spec,
)


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
        "machine": MACHINE,
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
    save_results(f"srd_vs_kd_{args.pair}", results, markdown(args.pair, results))


if __name__ == "__main__":
    main()
