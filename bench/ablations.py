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
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import (  # noqa: E402  (the shared pair settings, run helpers and tables)
    compared_spec,
    pair_settings,
    paired_markdown,
    prepare_base,
    save_results,
    srd,
    summarise_paired,
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
    results = summarise_paired(work, VARIANTS, SEEDS, [(variant, "srd") for variant in VARIANTS[1:]])
    table = paired_markdown(results, "SRD ablations: tiny pair", "the `bench/ablations.py` docstring; fkl")
    save_results("ablations_tiny", results, table)


if __name__ == "__main__":
    main()
