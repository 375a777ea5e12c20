"""SRD evidence with a competent student: KD vs SRD vs task-aware (stratified) SRD (#17, #27).

Protocol, fixed before running (results in bench/results/srd_evidence_<experiment>.{json,md}; the 3-seed
runs of #17, before stratification existed, are kept in srd_evidence_<experiment>_issue17.{json,md}):

- **Student:** SmolLM2-135M-Instruct pruned to 12 of 30 layers and healed on the original model's free
  text (``bench/heal_student.py``), so it is competent but untuned for every task scored here. Its
  ROUGE-L before distillation is the ``student_before`` row.
- **Teacher:** SmolLM2-135M-Instruct fine-tuned on the experiment's training rows (2 epochs, lr 1e-4,
  batch 8), as in ``bench/srd_vs_kd.py --pair smollm2``.
- **Experiments:**
  - ``healed`` (a): the demo task (four sub-tasks: animal, capital, colour, currency, in the ``task``
    column), 240 training rows; scored on the demo's held-out split and the full real sets of
    ../shared/data/eval (none of which is trained on).
  - ``real`` (b): real instruction data. ``bench/real_split.py`` splits the real sets: a seeded 80 % of
    Dolly and S-NI is the training pool, whose first 240 rows after a seeded shuffle are trained on (39
    ``topic`` values: 8 Dolly categories and 31 S-NI tasks, 1 to 18 rows each); the other 20 % of each plus
    all of Self-Instruct and Vicuna are the test sets. No example is in both (``tests/test_real_split.py``).
- **Variants**, each a plain ``srd run``, fkl, batch 8, lr 1e-4, the release's kd_weight / T per stage
  (0.8 / 1, 0.9 / 1.5, 1.0 / 2):
  - ``kd``: all rows, 2 + 2 + 1 epochs;
  - ``srd``: 4 buckets, hardest dropped, 2 epochs per stage over 1/4, 2/4, 3/4 of the rows (the release's
    global ranking);
  - ``srd_strat``: ``srd`` with ``rank.stratify_by``: the task column (``task`` for healed, ``topic`` for
    real): each task ranked alone, a quarter of each task dropped (none of a task under 4 rows);
  - ``srd_strat_refresh``: ``srd_strat`` with ``rank.refresh: every_stage`` (each refresh admits, per
    task, as many of its easiest remaining rows as its initial bucket held);
  - ``srd_clusters`` (real only): ``srd`` with ``rank.stratify_clusters: 11`` (k-means over TF-IDF of the
    prompts, seeded by the training seed; no labels used). 11 = round(sqrt(240 / 2)), the usual rule of
    thumb for k, chosen before any run. Agreement with the hidden ``topic`` labels is reported as the
    adjusted Rand index (ARI; 0 = chance, 1 = the labels), next to the same for a random permutation.
  - Also runnable (``--variants``), not in this protocol's tables unless run: ``srd_refresh`` and the
    top-k variants of #14/#17 (``srd_topk``, ``srd_topk_tail``, ``srd_topk1024``, healed only).
  - ``kd_short`` (post-hoc control, added after the real split's first two seeds put SRD's S-NI loss in
    tasks it trained on almost whole, not in deleted ones): KD on all rows at SRD's budget, 1 + 1 + 1
    epochs (90 steps, 0.6x KD's), so that SRD's curation is compared with simply training less. Reported
    as ``kd_short - kd``, ``srd - kd_short`` and ``srd_strat - kd_short`` once it has run for every
    finished seed (``--variants kd_short``).
  - ``srd_strat_long`` (post-hoc, after the protocol, on seeds of its own: ``--seeds 5 --variants
    kd,srd_strat,srd_strat_long``): ``srd_strat`` then a fourth stage of 1 epoch on every row (``keep_buckets:
    4``; the third stage's kd_weight / T), 132 steps, 0.88x KD's: does spending part of SRD's saving on the
    rows it held back reach full KD? Tabled in a section of its own against ``kd`` and ``srd_strat``.

  The release's budget is KD 20 epochs vs SRD 8 x (1/4 + 1/2 + 3/4) = 12. It is scaled to 5 vs 3 to fit
  2 CPU cores; the ratio stays 0.6 (stratified SRD trains on as many rows, within a row or two).
- **Seeds and scoring:** training seeds 0, 1, 2, 3, 4. ROUGE-L x100 of sampled answers (T 1, up to 32 new
  tokens) on 60 rows per set, sampling seeds 10 and 20. Responses are truncated to 32 tokens for
  training too.
- **Reported:** per variant, ROUGE-L per set and the average (mean ± std over training seeds), optimizer
  steps, train wall and end-to-end wall (end-to-end includes reflection and, for refresh runs, the
  re-reflections). The paired differences (same training seed) of every variant against ``kd``, and
  ``srd_strat - srd``, ``srd_strat_refresh - srd_strat``, ``srd_clusters - srd_strat``. Post-hoc: per
  task, the held-out ROUGE-L and the training rows of that task each variant ever trained on (healed: the
  demo held-out split by ``task``; real: the S-NI and Dolly test splits by ``topic``).
- **Goal (#27):** ``srd_strat - kd`` >= -0.5 on every set and >= 0 on the average, at <= 0.65x KD's
  steps; the currency task within 2 points of KD.

    python bench/srd_evidence.py --experiment healed     # about 2.5 hours on 2 cores (+25 min to heal the student)
    python bench/srd_evidence.py --experiment real       # about 7.5 hours on 2 cores (+50 min: heal, teacher)
    python bench/srd_evidence.py --experiment real --summarize   # the tables again from the finished runs

Each finished run is archived in ``bench/results/srd_evidence_<experiment>_runs.json`` (committed): its
record, its per-task scores and trained rows, its clusters' ARI, and a hash of the inputs every run shares
(training rows, fine-tuned teacher, untrained student). The tables are made from the archive alone, and a
rerun skips archived runs, so the protocol can be finished over several sessions on fresh machines. A
seed counts once all its variants come from one build of the inputs (a fresh machine's rebuild need not
be bit-identical): an unfinished seed's runs from another build are run again, and seeds from different
builds are flagged in the table. Where a seed ran ``kd``, ``srd`` and ``srd_strat`` but its other variants
were lost with a machine, those three are also tabled over every seed that ran them, in a section of their own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import (  # noqa: E402
    RESULTS,
    STAGE_SETTINGS,
    base_scores,
    base_spec,
    compared_spec,
    evaluated,
    pair_settings,
    paired_markdown,
    paired_summary,
    prepare_base,
    record,
    save_results,
    srd,
    teacher_of,
    write_spec,
)
from real_split import read_rows, write_split  # noqa: E402
from teacher_signal import run_spec as topk_spec  # noqa: E402

SEEDS = [0, 1, 2, 3, 4]
VARIANTS = {"healed": ["kd", "srd", "srd_strat", "srd_strat_refresh"],
            "real": ["kd", "srd", "srd_strat", "srd_strat_refresh", "srd_clusters"]}  # fmt: skip
OTHER_VARIANTS = ["srd_refresh", "kd_short", "srd_strat_long"]  # #17's, and post-hoc ones: with --variants
KD_SHORT_EPOCHS = [1, 1, 1]  # 90 steps of 240 rows at batch 8: SRD's 0.6x of KD's 2 + 2 + 1 epochs
TOPK_VARIANTS = {"srd_topk": 64, "srd_topk_tail": 64, "srd_topk1024": 1024}  # SRD, stored top-k signal: k
COMPARISONS = [("srd", "kd"), ("srd_strat", "kd"), ("srd_strat_refresh", "kd"), ("srd_clusters", "kd"),
               ("srd_strat", "srd"), ("srd_strat_refresh", "srd_strat"), ("srd_clusters", "srd_strat"),
               ("srd_refresh", "kd"), ("srd_refresh", "srd"), ("srd_topk", "srd"), ("srd_topk_tail", "srd"),
               ("srd_topk_tail", "srd_topk"), ("srd_topk1024", "srd"), ("srd_topk1024", "srd_topk_tail"),
               ("kd_short", "kd"), ("srd", "kd_short"), ("srd_strat", "kd_short"), ("srd_strat_long", "kd"),
               ("srd_strat_long", "srd_strat")]  # fmt: skip
CORE_VARIANTS = ["kd", "srd", "srd_strat"]  # #27's headline comparison, also tabled over every seed it has
# Tables of their own, over every archived seed that ran all of a group: #27's headline comparison, and the
# post-hoc srd_strat_long (run on later seeds, after the protocol) against what it extends.
SECTIONS = [CORE_VARIANTS, ["kd", "srd_strat", "srd_strat_long"]]
TRAINED_STAGES = {"srd_strat_long": 4}  # the stages (stage s: buckets 0..s) a variant trains, where not 3
TASK_COLUMN = {"healed": "task", "real": "topic"}  # the hidden task labels of the training rows
CLUSTERS = round(math.sqrt(240 / 2))  # 11, fixed before running
TRAIN_ROWS = 240
EVAL_ROWS, EVAL_SEEDS = 60, [10, 20]


def experiment_settings(experiment: str, work: Path, teacher: Path | None) -> dict[str, Any]:
    settings = pair_settings("smollm2_healed", ROOT / "bench" / ".cache")
    settings.update(eval_rows=EVAL_ROWS, eval_seeds=EVAL_SEEDS)
    if experiment == "real":
        settings.pop("prepare")
        files = write_split(work / "split")
        settings["train_file"] = str(training_rows(files["train"], work / "split" / f"train_{TRAIN_ROWS}.jsonl"))
        settings["eval_files"] = {name: str(path) for name, path in files.items() if name != "train"}
    if teacher is not None:  # already fine-tuned on exactly these training rows: skip the base fine-tune
        settings["models"]["teacher"], settings["teacher_sft"] = str(teacher), None
    return settings


def training_rows(pool: Path, out: Path) -> Path:
    """A seeded sample of the training pool, written once."""
    if not out.exists():
        rows = read_rows(pool)
        random.Random(0).shuffle(rows)
        partial = out.with_suffix(".partial")
        partial.write_text("".join(json.dumps(row) + "\n" for row in rows[:TRAIN_ROWS]))
        partial.rename(out)
    return out


def variant_spec(base: dict, settings: dict, work: Path, experiment: str, variant: str, seed: int) -> dict[str, Any]:
    if variant in TOPK_VARIANTS:  # the same top-k settings as bench/teacher_signal.py's runs
        spec = topk_spec(base, settings, work, "topk", seed)
        spec["teacher_signal"]["k"] = TOPK_VARIANTS[variant]
    else:
        spec = compared_spec(base, settings, work, "fkl", seed, "none" if variant.startswith("kd") else "srd")
    if variant == "kd_short":
        for stage, epochs in zip(spec["distill"]["stages"], KD_SHORT_EPOCHS, strict=True):
            stage["epochs"] = epochs
    spec["run"]["name"] = f"{variant}-seed{seed}"
    rank: dict[str, Any] = {}
    if variant.startswith("srd_strat"):
        rank["stratify_by"] = TASK_COLUMN[experiment]
    if variant == "srd_clusters":
        rank["stratify_clusters"] = CLUSTERS
    if variant == "srd_strat_long":  # srd_strat, then a 4th stage, 1 epoch on every row: 132 steps, 0.88x KD's
        rank["keep_buckets"] = TRAINED_STAGES[variant]
        spec["distill"]["stages"].append({**spec["distill"]["stages"][-1], "epochs": 1})
    if variant.endswith("refresh"):
        rank["refresh"] = "every_stage"
    spec["rank"].update(rank)
    return spec


def all_variants() -> list[str]:
    return list(dict.fromkeys([*VARIANTS["real"], *OTHER_VARIANTS, *TOPK_VARIANTS]))


def trained_ids(run: Path, variant: str) -> list[str] | None:
    """The example ids of the rows a run ever trained on (None: every training row, as KD does)."""
    import pyarrow.parquet as pq

    from srd_ray.rank import bucket_dir
    from srd_ray.refresh import refresh_dir

    if variant.startswith("kd"):
        return None
    stages = range(TRAINED_STAGES.get(variant, len(STAGE_SETTINGS)))
    if variant.endswith("refresh"):  # bucket 0 as ranked first; each later one as its refresh admitted it
        buckets = [bucket_dir(run / "rank", 0)] + [
            bucket_dir(refresh_dir(run / "distill", s) / "rank", s) for s in stages[1:]
        ]
    else:
        buckets = [bucket_dir(run / "rank", s) for s in stages]
    return [i for bucket in buckets for i in pq.read_table(bucket, columns=["example_id"])["example_id"].to_pylist()]


def task_sets(experiment: str, work: Path) -> dict[str, Path]:
    """The eval sets broken down by task, and their files (with the task column)."""
    if experiment == "healed":
        return {"demo_heldout": work / "base/prepare/demo_heldout.jsonl"}
    return {"sinst_test": work / "split/sinst_test.jsonl", "dolly_test": work / "split/dolly_test.jsonl"}


def training_tasks(experiment: str, work: Path, base: dict) -> dict[str, str]:
    """Each training row's task, by example_id (as the pipeline computes ids)."""
    from srd_ray.data import load_training_data
    from srd_ray.spec import DataSpec

    resolved = json.loads(json.dumps(base["data"]).replace("${run_dir}", str(work / "base")))
    data = DataSpec.model_validate({**resolved, "eval_sets": {}})
    table = load_training_data(data).table
    return dict(zip(table["example_id"].to_pylist(), table[TASK_COLUMN[experiment]].to_pylist(), strict=True))


def heldout_by_task(experiment: str, work: Path, run: Path) -> dict[str, dict[str, list[float]]]:
    """Per broken-down eval set and task, the ROUGE-L of each of the run's sampled answers."""
    import pyarrow.parquet as pq

    column, result = TASK_COLUMN[experiment], {}
    predictions = pq.read_table(run / "evaluate/student_after/predictions.parquet").to_pylist()
    for eval_set, path in task_sets(experiment, work).items():
        task_of = {row["prompt"]: row[column] for row in read_rows(path)}
        scores: dict[str, list[float]] = {}
        for row in predictions:
            if row["eval_set"] == eval_set:
                scores.setdefault(task_of[row["prompt"]], []).append(row["rouge_l"])
        result[eval_set] = dict(sorted(scores.items()))
    return result


def trained_rows_by_task(train: dict[str, str], run: Path, variant: str) -> dict[str, int]:
    """How many of each task's training rows the run ever trained on."""
    trained = dict.fromkeys(sorted(set(train.values())), 0)
    for example_id in trained_ids(run, variant) or train:
        trained[train[example_id]] += 1
    return trained


def by_task(runs: dict[str, list[dict]], totals: dict[str, int]) -> dict[str, Any]:
    """Post-hoc (not in the fixed protocol): per task of each broken-down eval set, the held-out ROUGE-L
    (mean over seeds and sampling seeds) and how many of its training rows each variant ever trained on
    (mean over seeds), from the runs' evidence (``run_evidence``)."""
    result: dict[str, Any] = {}
    for eval_set in next(iter(runs.values()))[0]["heldout_by_task"]:
        per_variant: dict[str, Any] = {}
        for variant, evidence in runs.items():
            scores: dict[str, list[float]] = {}
            for run in evidence:
                for task, values in run["heldout_by_task"][eval_set].items():
                    scores.setdefault(task, []).extend(values)
            trained = {task: sum(run["trained_rows_by_task"][task] for run in evidence) for task in totals}
            per_variant[variant] = {
                "heldout_rouge_l": {task: sum(v) / len(v) for task, v in sorted(scores.items())},
                "trained_rows": {task: count / len(evidence) for task, count in trained.items()},
            }
        result[eval_set] = per_variant
    result["training_rows_per_task"] = totals
    return result


def by_task_markdown(tasks: dict[str, Any]) -> str:
    lines = []
    totals = tasks["training_rows_per_task"]
    for eval_set, per_variant in tasks.items():
        if eval_set == "training_rows_per_task":
            continue
        variants = list(per_variant)
        names = sorted({t for result in per_variant.values() for t in result["heldout_rouge_l"]})
        lines += [
            "",
            f"Post-hoc, not in the fixed protocol: {eval_set} ROUGE-L per task, mean over seeds and sampling seeds "
            "(in brackets: training rows of that task ever trained on, mean over seeds, of the total):",
            "",
            "| task | " + " | ".join(variants) + " |",
            "|---|" + "---|" * len(variants),
        ]
        for task in names:
            cells = []
            for variant in variants:
                score = per_variant[variant]["heldout_rouge_l"].get(task)
                rows = per_variant[variant]["trained_rows"].get(task, 0)
                cells.append("-" if score is None else f"{score:.1f} ({rows:.1f}/{totals.get(task, 0)})")
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cluster_ari(train: dict[str, str], run: Path, seed: int) -> dict[str, float]:
    """Adjusted Rand index of an srd_clusters run's clusters against the hidden task labels, and of a random
    permutation of the same clusters (chance)."""
    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    from srd_ray.rank import read_ranked

    ranked = read_ranked(run / "rank")
    truth = [train[i] for i in ranked["example_id"].to_pylist()]
    clusters = ranked["cluster"].to_pylist()
    chance = np.random.default_rng(seed).permutation(clusters)
    return {"ari": adjusted_rand_score(truth, clusters), "ari_chance": adjusted_rand_score(truth, chance)}


def cluster_agreement(runs: dict[str, list[dict]], labels: int) -> dict[str, Any] | None:
    if "srd_clusters" not in runs:
        return None
    evidence = runs["srd_clusters"]
    return {"clusters": CLUSTERS, "labels": labels, "ari": [run["cluster_ari"]["ari"] for run in evidence],
            "ari_chance": [run["cluster_ari"]["ari_chance"] for run in evidence]}  # fmt: skip


def clusters_without_training(work: Path, seeds: list[int]) -> None:
    """``--cluster-agreement``: the rank stage's clusters of the real training rows (the same prompts, the
    same k and seeds as ``srd_clusters``) against their hidden topics, computed without any run, into
    bench/results/srd_evidence_clusters.{json,md}."""
    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    from srd_ray.data import load_training_data
    from srd_ray.spec import DataSpec
    from srd_ray.strata import cluster_prompts

    train = work / "split" / f"train_{TRAIN_ROWS}.jsonl"
    if not train.exists():
        training_rows(write_split(work / "split")["train"], train)
    table = load_training_data(DataSpec.model_validate({"train": {"path": str(train)}})).table
    truth = table[TASK_COLUMN["real"]].to_pylist()
    agreement: dict[str, Any] = {"clusters": CLUSTERS, "labels": len(set(truth)), "ari": [], "ari_chance": []}
    for seed in seeds:
        clusters = cluster_prompts(table["prompt"].to_pylist(), CLUSTERS, seed)
        agreement["ari"].append(adjusted_rand_score(truth, clusters))
        agreement["ari_chance"].append(adjusted_rand_score(truth, np.random.default_rng(seed).permutation(clusters)))
    agreement["seeds"] = seeds
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "srd_evidence_clusters.json").write_text(json.dumps(agreement, indent=2) + "\n")
    text = f"# Prompt clusters vs hidden topics (real split, {table.num_rows} training rows)\n" + cluster_markdown(
        agreement
    )
    (RESULTS / "srd_evidence_clusters.md").write_text(text)
    print(text)


def cluster_markdown(agreement: dict[str, Any]) -> str:
    from common import mean_std

    ari, chance = mean_std(agreement["ari"]), mean_std(agreement["ari_chance"])
    return (
        f"\nClusters (srd_clusters): {agreement['clusters']} k-means clusters of the training prompts against "
        f"the {agreement['labels']} hidden topic labels: adjusted Rand index {ari[0]:.3f} ± {ari[1]:.3f} over "
        f"seeds (a random permutation of the clusters: {chance[0]:+.3f} ± {chance[1]:.3f}).\n"
    )


def section_markdown(found: dict[str, Any]) -> str:
    title = f"{', '.join(found['runs'])} over every training seed that ran them all: {found['seeds']}"
    builds = (
        f"Builds of the training rows, teacher and student (per run, as archived): {found['inputs']}; the teacher "
        "and student_before rows are the archive's reference, scored on the build of its first runs.\n"
    )
    return "\n#" + paired_markdown(found, title, "as above") + "\n" + builds  # a section of the page: "## title"


def archive_path(experiment: str) -> Path:
    return RESULTS / f"srd_evidence_{experiment}_runs.json"


def read_archive(experiment: str) -> dict[str, Any]:
    path = archive_path(experiment)
    return json.loads(path.read_text()) if path.exists() else {"experiment": experiment, "runs": {}}


def inputs_fingerprint(settings: dict[str, Any], work: Path) -> str:
    """A hash of what every run of the experiment shares (the training rows, the fine-tuned teacher, the
    untrained student). Each session on a fresh machine rebuilds them, so the archive keeps it per run: runs
    from different builds are flagged in the table instead of being silently compared."""
    digest = hashlib.sha256()
    files = [Path(settings.get("train_file", work / "base/prepare/demo_train.jsonl"))]
    for model in (teacher_of(settings, work), settings["models"]["student"]):
        files += sorted(Path(model).glob("*.safetensors"))
    for path in files:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def run_evidence(experiment: str, work: Path, train: dict[str, str], variant: str, seed: int) -> dict[str, Any]:
    """Everything the tables read from one finished run, small enough to commit."""
    run = work / f"{variant}-seed{seed}"
    evidence = {
        "record": record(run),
        "heldout_by_task": heldout_by_task(experiment, work, run),
        "trained_rows_by_task": trained_rows_by_task(train, run, variant),
    }
    if variant == "srd_clusters":
        evidence["cluster_ari"] = cluster_ari(train, run, seed)
    return evidence


def archive_finished_runs(experiment: str, work: Path, settings: dict, base: dict, seeds: list[int]) -> dict:
    """Adds each finished run under ``work`` that the archive (``bench/results/srd_evidence_<experiment>_runs
    .json``) lacks. The protocol takes longer than a development session, and a new session starts on a fresh
    machine: the archive is what carries finished seeds over, and what the tables are made from."""
    archive = read_archive(experiment)
    new = [(v, s) for s in seeds for v in all_variants()
           if f"{v}-seed{s}" not in archive["runs"] and evaluated(work / f"{v}-seed{s}")]  # fmt: skip
    if not new:
        return archive
    train, inputs = training_tasks(experiment, work, base), inputs_fingerprint(settings, work)
    archive.setdefault("reference", base_scores(work))
    archive.setdefault("training_rows_per_task", {t: [*train.values()].count(t) for t in sorted(set(train.values()))})
    for variant, seed in new:
        archive["runs"][f"{variant}-seed{seed}"] = {
            "inputs": inputs,
            **run_evidence(experiment, work, train, variant, seed),
        }
    write_archive(experiment, archive)
    return archive


def write_archive(experiment: str, archive: dict[str, Any]) -> None:
    path = archive_path(experiment)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(archive, indent=1, sort_keys=True) + "\n")
    partial.rename(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", choices=["healed", "real"], required=True)
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="training seeds (finished runs are reused)")
    parser.add_argument("--variants", help="which variants to run (default: the protocol's for the experiment)")
    parser.add_argument("--teacher", type=Path, help="a teacher already fine-tuned on the same training rows")
    parser.add_argument("--summarize", action="store_true", help="only rewrite the results from finished runs")
    parser.add_argument("--cluster-agreement", action="store_true", help="only the clusters' ARI (real, no runs)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = (ROOT / "bench" / ".cache" / "srd_evidence" / args.experiment).resolve()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    if args.cluster_agreement:
        return clusters_without_training(work, seeds)
    variants = args.variants.split(",") if args.variants else VARIANTS[args.experiment]
    archive = read_archive(args.experiment)
    todo = [s for s in seeds if not finished_seed(archive, variants, s)]
    unarchived = any(run.name not in archive["runs"] and evaluated(run) for run in work.glob("*-seed*"))
    if (todo and not args.summarize) or unarchived:  # building the models (settings) can take an hour
        settings = experiment_settings(args.experiment, work, args.teacher)
        base = prepare_base(settings, work) if not args.summarize else base_spec(settings, work)
        archive_finished_runs(args.experiment, work, settings, base, seeds)
        if not args.summarize:
            run_protocol(args.experiment, work, settings, base, todo, variants)
    write_results(args.experiment, read_archive(args.experiment), seeds)


def seed_runs(archive: dict[str, Any], variants: list[str], seed: int) -> dict[str, dict]:
    return {v: archive["runs"][f"{v}-seed{seed}"] for v in variants if f"{v}-seed{seed}" in archive["runs"]}


def finished_seed(archive: dict[str, Any], variants: list[str], seed: int) -> bool:
    """Every variant of the seed archived, from one build of the inputs: a paired difference compares runs
    of the same teacher and student. (A rebuild on a fresh machine need not give the same bits: one gave
    the pruned student's validation CEs of bench/results/healed_student.md within 0.06, not equal.)"""
    runs = seed_runs(archive, variants, seed)
    return len(runs) == len(variants) and len({run["inputs"] for run in runs.values()}) == 1


def run_protocol(experiment: str, work: Path, settings: dict, base: dict, seeds: list[int], variants: list[str]):
    """Seed-major, so that an interrupted run still leaves whole seeds to compare. An unfinished seed's
    archived runs from another build of the inputs (an earlier session's) are run again with this one."""
    inputs = inputs_fingerprint(settings, work)
    for seed in seeds:
        archive = read_archive(experiment)
        stale = [f"{v}-seed{seed}" for v, run in seed_runs(archive, variants, seed).items() if run["inputs"] != inputs]
        if stale:
            print(f"[bench] seed {seed}: {stale} came from another build of the inputs; running them again", flush=True)
            write_archive(experiment, {**archive, "runs": {k: v for k, v in archive["runs"].items() if k not in stale}})
        for variant in variants:
            if f"{variant}-seed{seed}" in read_archive(experiment)["runs"]:
                continue
            if not evaluated(work / f"{variant}-seed{seed}"):
                srd("run", str(write_spec(variant_spec(base, settings, work, experiment, variant, seed), work)))
            archive_finished_runs(experiment, work, settings, base, [seed])


def summarized(experiment: str, archive: dict[str, Any], seeds: list[int], variants: list[str], tabled=None):
    """The paired tables' numbers over the seeds whose every one of ``variants`` finished from one build of
    the inputs, for each of ``tabled`` (default: every variant) archived from those builds, with the builds
    they came from; and the runs' evidence, by variant."""
    seeds = [s for s in seeds if finished_seed(archive, variants, s)]
    if not seeds:
        raise SystemExit(f"no training seed has every variant of {variants} in {archive_path(experiment)}")
    done = archive["runs"]
    build = {s: done[f"{variants[0]}-seed{s}"]["inputs"] for s in seeds}  # one per finished seed
    evidence = {v: [done[f"{v}-seed{s}"] for s in seeds] for v in tabled or all_variants()
                if all(done.get(f"{v}-seed{s}", {}).get("inputs") == build[s] for s in seeds)}  # fmt: skip
    comparisons = [(v, b) for v, b in COMPARISONS if v in evidence and b in evidence]
    runs = {variant: [run["record"] for run in runs] for variant, runs in evidence.items()}
    results = paired_summary(runs, seeds, archive["reference"], comparisons)
    results["inputs"] = sorted({run["inputs"] for runs in evidence.values() for run in runs})
    return results, evidence


def section(experiment: str, archive: dict[str, Any], whole: list[int], variants: list[str]) -> dict | None:
    """``variants`` over every archived seed that ran them all from one build, where that says more than
    the protocol's tables: more seeds than the whole ones (a seed's other variants can be lost with a machine,
    and a fresh one's rebuild of the inputs is not bit-identical), or a variant the protocol does not run."""
    archived = sorted({int(name.rsplit("-seed", 1)[1]) for name in archive["runs"]})
    seeds = [s for s in archived if finished_seed(archive, variants, s)]
    if not seeds or (seeds == whole and set(variants) <= set(VARIANTS[experiment])):
        return None
    return summarized(experiment, archive, seeds, variants, tabled=variants)[0]


def write_results(experiment: str, archive: dict[str, Any], seeds: list[int]) -> None:
    # An interrupted protocol is summarised over the seeds whose every protocol variant finished.
    results, evidence = summarized(experiment, archive, seeds, VARIANTS[experiment])
    results["experiment"] = experiment
    results["by_task"] = by_task(evidence, archive["training_rows_per_task"])
    results["cluster_agreement"] = cluster_agreement(evidence, len(archive["training_rows_per_task"]))
    results["sections"] = [
        found for group in SECTIONS if (found := section(experiment, archive, results["seeds"], group))
    ]
    title = f"SRD evidence ({experiment}): KD vs SRD vs stratified SRD, healed 12-layer SmolLM2 student"
    table = paired_markdown(results, title, "the `bench/srd_evidence.py` docstring")
    if len(results["seeds"]) < len(SEEDS):  # say so where a reader looks first
        core = [found for found in results["sections"] if list(found["runs"]) == CORE_VARIANTS]
        core_seeds = f" ({len(core[0]['seeds'])} ran kd, srd and srd_strat: their table is below)" if core else ""
        table = table.replace(
            "\n\n",
            f"\n\n**{len(results['seeds'])} of the protocol's {len(SEEDS)} training seeds finished{core_seeds}; "
            "a ± 0.00 is one seed, not a measured spread.**\n\n",
            1,
        )
    inputs = results["inputs"]
    if len(inputs) > 1:  # sessions rebuilt the teacher and student differently: say so, do not hide it
        table += (
            f"\n**The runs come from {len(inputs)} builds of the training rows, teacher and student** ({inputs}).\n"
        )
    # The runs take hours on a development machine that does other work meanwhile (a run may also be paused
    # and resumed): its seconds are not a cost measure, its optimizer steps are.
    table += (
        "\nCompute: compare the steps column. The train and end-to-end seconds are wall time on a 2-core machine "
        "that at times ran other work beside a run, or paused and resumed it.\n"
    )
    if results["cluster_agreement"]:
        table += cluster_markdown(results["cluster_agreement"])
    table += by_task_markdown(results["by_task"])
    for found in results["sections"]:  # after everything over the protocol's whole seeds
        table += section_markdown(found)
    save_results(f"srd_evidence_{experiment}", results, table)


if __name__ == "__main__":
    main()
