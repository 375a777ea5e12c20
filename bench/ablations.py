"""The SRD paper's ablations on the tiny pair: curriculum order, temperature schedule, dropping the hardest
bucket.

Protocol, fixed before running (results in bench/results/ablations_tiny.{json,md}):

- Pair, data, fine-tuned teacher and budget as ``bench/srd_vs_kd.py --pair tiny`` (its ``base`` run is
  shared): fkl, 8 epochs per stage, batch 32, lr 5e-4, training seeds 0, 1, 2, evaluation on the demo's
  held-out split and the real sets (100 rows each, sampling seeds 10, 20, 30).
- ``srd``: the release, easy to hard, kd_weight / T per stage 0.8 / 1, 0.9 / 1.5, 1.0 / 2, 4 buckets,
  the hardest dropped (stages over buckets {0}, {0,1}, {0,1,2}).
- Order (``rank.order``): ``hard_to_easy`` (the difficulty order reversed: bucket 0 is the hardest
  quarter and the easiest quarter is the one dropped) and ``random`` (buckets of random rows, seeded by
  the training seed).
- Temperature: ``constant`` T 1 / 1 / 1 and ``falling`` T 2 / 1.5 / 1 (kd_weight as the release).
- Buckets: ``keep_all``: 4 buckets, all kept, a 4th stage over all rows with the 3rd stage's kd_weight,
  T and epochs. It trains on more data (8 x (1/4 + 1/2 + 3/4 + 1) = 20 epochs' worth instead of 12), so
  its optimizer steps are reported next to its scores.

Each variant changes one thing against ``srd``. Reported per variant: ROUGE-L x100 per set and their
average (mean ± std over training seeds), the paired difference from ``srd`` with its std, optimizer
steps, train wall and end-to-end wall (reflect + rank + distill).

    python bench/ablations.py        # about 40 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from srd_vs_kd import (  # noqa: E402  (the shared pair settings and run helpers)
    RESULTS,
    base_scores,
    compared_spec,
    evaluated,
    mean_std,
    pair_settings,
    prepare_base,
    run_record,
    srd,
    write_spec,
)

SEEDS = [0, 1, 2]
VARIANTS = ["srd", "hard_to_easy", "random", "constant_t", "falling_t", "keep_all"]


def variant_spec(base: dict, settings: dict, work: Path, variant: str, seed: int) -> dict[str, Any]:
    spec = compared_spec(base, settings, work, "fkl", seed, "srd")
    spec["run"]["name"] = f"{variant}-seed{seed}"
    stages = spec["distill"]["stages"]
    if variant in ("hard_to_easy", "random"):
        spec["rank"]["order"] = variant
    elif variant == "constant_t":
        for stage in stages:
            stage["temperature"] = 1.0
    elif variant == "falling_t":
        for stage, temperature in zip(stages, (2.0, 1.5, 1.0), strict=True):
            stage["temperature"] = temperature
    elif variant == "keep_all":
        spec["rank"].update(num_buckets=4, keep_buckets=4)
        stages.append(dict(stages[-1]))
    return spec


def record(run_dir: Path) -> dict[str, Any]:
    result = run_record(run_dir)
    result["average"] = statistics.fmean(result["scores"].values())
    return result


def paired_differences(runs: list[dict], baseline: list[dict], sets: list[str]) -> dict[str, tuple[float, float]]:
    """Per set and for the average: mean ± std over seeds of (run - baseline run of the same seed)."""
    pairs = list(zip(runs, baseline, strict=True))
    differences = {name: mean_std([r["scores"][name] - b["scores"][name] for r, b in pairs]) for name in sets}
    return differences | {"average": mean_std([r["average"] - b["average"] for r, b in pairs])}


def summarise(work: Path, variants: list[str], seeds: list[int], comparisons: list[tuple[str, str]]) -> dict:
    """Over the seeds whose every variant finished (all of ``seeds`` unless a run was cut short), with the
    paired differences of each (variant, baseline) in ``comparisons``."""
    seeds = [seed for seed in seeds if all(evaluated(work / f"{variant}-seed{seed}") for variant in variants)]
    runs = {variant: [record(work / f"{variant}-seed{seed}") for seed in seeds] for variant in variants}
    sets = sorted(runs[variants[0]][0]["scores"])
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU",
        "seeds": seeds,
        "eval_sets": sets,
        "reference": base_scores(work),
        "runs": runs,
        "differences": [
            {"variant": v, "baseline": b, "difference": paired_differences(runs[v], runs[b], sets)}
            for v, b in comparisons
        ],
    }


def markdown(results: dict[str, Any], title: str, protocol: str) -> str:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summarize", action="store_true", help="only rewrite the results from finished runs")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = (ROOT / "bench" / ".cache" / "srd_vs_kd" / "tiny").resolve()
    settings = pair_settings("tiny", ROOT / "bench" / ".cache")
    if not args.summarize:
        base = prepare_base(settings, work)
        for seed in SEEDS:  # seed-major: an interrupted run still leaves whole seeds to compare
            for variant in VARIANTS:
                srd("run", str(write_spec(variant_spec(base, settings, work, variant, seed), work)))
    results = summarise(work, VARIANTS, SEEDS, [(variant, "srd") for variant in VARIANTS[1:]])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ablations_tiny.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results, "SRD ablations: tiny pair", "the `bench/ablations.py` docstring; fkl")
    (RESULTS / "ablations_tiny.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
