"""What users see of a run: the console summary at its end, ``srd report RUN_DIR`` (HTML + PNG plots) and
``srd compare RUN_A RUN_B ...``.

Both read only the run directory (``run.json``, rank buckets, ``distill/metrics.jsonl``), so they work on
any run: local, on shared storage, copied from a cluster, or on an object store (``s3://...``). Plots need
matplotlib (``pip install 'srd-ray[report]'``).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from srd_ray import storage
from srd_ray.errors import RunDirError
from srd_ray.run_dir import MANIFEST
from srd_ray.storage import Location, Place

BUCKET_COLORS = ["#2a9d8f", "#e9c46a", "#f4a261", "#e76f51", "#8d99ae", "#6d597a", "#355070", "#b56576"]


def load_manifest(run_dir: Place) -> dict[str, Any]:
    path = Location.of(run_dir) / MANIFEST
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not an srd-ray run directory (no {MANIFEST})")
    return json.loads(path.read_text())


def stage_summary(manifest: dict[str, Any], stage: str) -> dict[str, Any]:
    return manifest["stages"].get(stage, {}).get("summary") or {}


# --------------------------------------------------------------------------------------------------------
# The console summary (the same figures the HTML report shows)


def summary_lines(manifest: dict[str, Any]) -> list[str]:
    """A short human summary of a run: rows, buckets, losses, eval scores."""
    stages = manifest["stages"]
    lines = [f"run {manifest['run']}"]
    reflect = stages.get("reflect", {}).get("summary")
    if reflect:
        lines.append(
            f"  reflect ({reflect.get('engine', '?')} engine): {reflect['rows']} rows, "
            f"mean ROUGE-L {reflect['mean_rouge_l']:.3f}, mean student CE {reflect['mean_student_ce']:.3f}, "
            f"{len(reflect.get('skipped_rows', [])) + len(reflect.get('rejected_rows', []))} skipped"
        )
    rank = stages.get("rank", {}).get("summary")
    if rank:
        for bucket in rank["buckets"]:
            truth = bucket.get("mean_true_difficulty")
            lines.append(
                f"  bucket {bucket['bucket']}{'' if bucket['kept'] else ' (dropped)'}: {bucket['rows']} rows, "
                f"ROUGE-L {bucket['rouge_l']['mean']:.3f}, CE {bucket['student_ce']['mean']:.3f}"
                + (f", true difficulty {truth:.2f}" if truth is not None else "")
            )
        lines += ["  " + line for line in strata_lines(rank)]
    for refresh in (stages.get("distill", {}).get("summary") or {}).get("refresh", []):
        lines.append("  " + refresh_line(refresh))
    for name in ("teacher_sft", "distill"):
        summary = stages.get(name, {}).get("summary")
        if summary:
            losses = ", ".join(
                f"stage {s['stage']} {s['first_loss']:.3f}->{s['last_loss']:.3f}" for s in summary["stages"]
            )
            lines.append(
                f"  {name}: {summary['optimizer_steps']} steps, {summary['tokens_seen']} tokens, "
                f"{summary['train_wall_s']:.1f}s; loss {losses}"
            )
    evaluation = stages.get("evaluate", {}).get("summary")
    if evaluation and "skipped" not in evaluation:
        sets = sorted({name for result in evaluation.values() for name in result})
        lines.append("  ROUGE-L (x100, mean ± std over seeds):")
        lines.append("    " + f"{'model':<16}" + "".join(f"{name:>18}" for name in sets))
        for label, result in evaluation.items():
            cells = "".join(
                f"{result[name]['rouge_l']:>11.2f} ± {result[name]['rouge_l_std']:<4.2f}"
                if name in result
                else f"{'-':>18}"
                for name in sets
            )
            lines.append(f"    {label:<16}{cells}")
    lines += lm_eval_lines(stages.get("lm_eval", {}).get("summary") or {})
    return lines


def lm_eval_columns(scores: dict[str, dict[str, dict[str, float]]]) -> list[tuple[str, str]]:
    """(task, metric) pairs any model has a score for, stderr left out, sorted."""
    return sorted({(task, metric) for tasks in scores.values() for task, metrics in tasks.items()
                   for metric in metrics if "_stderr" not in metric})  # fmt: skip


def lm_eval_lines(scores: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The console's lm-eval table (x100): one row per model, one column per task and metric."""
    columns = lm_eval_columns(scores)
    if not columns:
        return []
    lines = ["  lm-eval (x100):", "    " + f"{'model':<16}" + "".join(f"{f'{t} {m}':>22}" for t, m in columns)]
    for label, tasks in scores.items():
        cells = "".join(f"{100 * tasks[t][m]:>22.2f}" if m in tasks.get(t, {}) else f"{'-':>22}" for t, m in columns)
        lines.append(f"    {label:<16}{cells}")
    return lines


def strata_lines(rank: dict[str, Any]) -> list[str]:
    """How the ranking treated the data's strata and tasks: stratified or not, and the tasks whose rows the
    dropped buckets took most of (the three most dropped)."""
    lines = []
    if rank.get("strata"):
        strata = rank["strata"]
        lines.append(f"stratified by {strata['column']}: {len(strata['groups'])} strata, each ranked alone")
    tasks = rank.get("tasks")
    if tasks and rank.get("most_dropped_tasks"):
        worst = ", ".join(f"{g['value']} {g['dropped']}/{g['rows']} ({100 * g['dropped_share']:.0f}%)"
                          for g in rank["most_dropped_tasks"])  # fmt: skip
        lines.append(f"most dropped {tasks['column']}s: {worst}")
    lines += [f"warning: {line.removeprefix('rank: ')}" for line in rank.get("warnings", [])]
    return lines


# --------------------------------------------------------------------------------------------------------
# srd compare


def compare_runs(run_dirs: list[Place]) -> str:
    """A markdown table: ROUGE-L of the distilled student per eval set and on average, training wall time,
    optimizer steps and tokens seen, and every later run's ratio to the first."""
    rows = []
    for run_dir in run_dirs:
        manifest = load_manifest(run_dir)
        evaluation = stage_summary(manifest, "evaluate").get("student_after", {})
        distill = stage_summary(manifest, "distill")
        scores = {name: result["rouge_l"] for name, result in evaluation.items()}
        benchmarks = stage_summary(manifest, "lm_eval").get("student_after", {})
        lm_eval = {f"lm-eval {t} {m}": 100 * v for t, metrics in benchmarks.items() for m, v in metrics.items()
                   if "_stderr" not in m}  # fmt: skip
        rows.append(
            {
                "run": manifest["run"],
                "curriculum": distill.get("curriculum", "-"),
                "scores": scores,
                "average": sum(scores.values()) / len(scores) if scores else None,
                "train_wall_s": distill.get("train_wall_s"),
                "optimizer_steps": distill.get("optimizer_steps"),
                "tokens_seen": distill.get("tokens_seen"),
                **lm_eval,
            }
        )
    sets = sorted({name for row in rows for name in row["scores"]})
    benchmark_columns = sorted({key for row in rows for key in row if key.startswith("lm-eval ")})
    columns = [*sets, "average", "train_wall_s", "optimizer_steps", "tokens_seen", *benchmark_columns]
    lines = [
        "| run | curriculum | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for row in rows:
        values = [row["scores"].get(name) for name in sets] + [row.get(c) for c in columns[len(sets) :]]
        lines.append(f"| {row['run']} | {row['curriculum']} | " + " | ".join(_cell(v) for v in values) + " |")
    base = rows[0]
    for row in rows[1:]:
        ratios = [_ratio(row["scores"].get(n), base["scores"].get(n)) for n in sets]
        ratios += [_ratio(row.get(c), base.get(c)) for c in columns[len(sets) :]]
        lines.append(f"| {row['run']} / {base['run']} | ratio | " + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


def find_baselines(run_dir: Place) -> list[Location]:
    """Finished ``curriculum: none`` runs next to ``run_dir`` (same output_dir): its matched KD baselines."""
    run = Location.of(run_dir)
    baselines = []
    for candidate in run.parent.children():
        if candidate.name == run.name:
            continue
        try:
            stages = load_manifest(candidate).get("stages", {})
        except RunDirError:  # a folder beside the run that is not a run
            continue
        curriculum = (stages.get("distill", {}).get("summary") or {}).get("curriculum")
        if curriculum == "none" and stages.get("evaluate", {}).get("status") == "complete":
            baselines.append(candidate)
    return baselines


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _ratio(value: Any, base: Any) -> str:
    return f"{value / base:.2f}x" if value is not None and base else "-"


# --------------------------------------------------------------------------------------------------------
# srd report


def read_ranked(run_dir: Place) -> pa.Table | None:
    """The rank stage's rows, if the run has ranked."""
    from srd_ray import rank

    rank_dir = Location.of(run_dir) / "rank"
    return rank.read_ranked(rank_dir) if (rank_dir / rank.MANIFEST).exists() else None


def read_metrics(run_dir: Place) -> list[dict[str, Any]]:
    path = Location.of(run_dir) / "distill" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def write_report(run_dir: Place) -> Location:
    """Write ``report.html`` and its PNGs into ``run_dir/report/``; returns the HTML path."""
    import matplotlib

    matplotlib.use("Agg")
    manifest = load_manifest(run_dir)
    report_dir = Location.of(run_dir) / "report"
    with storage.directory(report_dir) as out:
        _write_report_files(manifest, run_dir, out)
    return report_dir / "report.html"


def _write_report_files(manifest: dict[str, Any], run_dir: Place, out: Path) -> None:
    sections: list[str] = []
    ranked = read_ranked(run_dir)
    rank = stage_summary(manifest, "rank")
    if ranked is not None and rank:
        sections.append(_figure(out, "signals.png", _plot_signals(ranked), "Reflected rows: ROUGE-L vs student CE"))
        sections.append(_figure(out, "buckets.png", _plot_buckets(rank), "Bucket sizes and signal ranges"))
        sections.append(_bucket_table(rank))
        for key in ("tasks", "strata"):
            if rank.get(key) and (key == "tasks" or rank["strata"]["column"] != rank.get("tasks", {}).get("column")):
                sections.append(_groups_section(out, key, rank[key], rank))
    distill = stage_summary(manifest, "distill")
    if rank and distill.get("curriculum") == "srd":
        sections.append(_figure(out, "stage_rows.png", _plot_stage_rows(manifest, rank), "Rows per curriculum stage"))
    if distill.get("refresh"):
        sections.append(refresh_section(distill))
    if distill:
        sections.append(teacher_signal_section(distill, manifest["stages"].get("teacher_signal", {})))
    metrics = read_metrics(run_dir)
    if any("event" not in m for m in metrics):
        sections.append(_figure(out, "loss.png", _plot_losses(metrics), "Training loss per stage"))
    evaluation = stage_summary(manifest, "evaluate")
    if evaluation and "skipped" not in evaluation:
        sections.append(_eval_table(evaluation))
    benchmarks = stage_summary(manifest, "lm_eval")
    if lm_eval_columns(benchmarks):
        sections.append(_lm_eval_table(benchmarks))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>srd-ray run {html.escape(manifest['run'])}</title>"
        "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}</style></head><body>"
        f"<h1>srd-ray run <code>{html.escape(manifest['run'])}</code></h1>" + "\n".join(sections) + "</body></html>"
    )
    (out / "report.html").write_text(page, encoding="utf-8")


def _figure(out: Path, name: str, figure: Any, title: str) -> str:
    figure.savefig(out / name, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return f"<h2>{html.escape(title)}</h2><img src='{name}' alt='{html.escape(title)}'>"


def _plot_signals(ranked: pa.Table) -> Any:
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    buckets = ranked["bucket"].to_numpy()
    for bucket in sorted(set(buckets.tolist())):
        chosen = buckets == bucket
        axis.scatter(
            ranked["student_ce"].to_numpy()[chosen],
            ranked["rouge_l"].to_numpy()[chosen],
            s=8,
            alpha=0.6,
            color=BUCKET_COLORS[bucket % len(BUCKET_COLORS)],
            label=f"bucket {bucket}",
        )
    axis.set_xlabel("student CE on the reference (lower = easier)")
    axis.set_ylabel("ROUGE-L of the student's answer (higher = easier)")
    axis.legend()
    return figure


def _plot_buckets(rank: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    buckets = rank["buckets"]
    labels = [f"{b['bucket']}{'' if b['kept'] else ' (dropped)'}" for b in buckets]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    colors = [BUCKET_COLORS[b["bucket"] % len(BUCKET_COLORS)] for b in buckets]
    axes[0].bar(labels, [b["rows"] for b in buckets], color=colors)
    axes[0].set_title("rows")
    for axis, signal in zip(axes[1:], ("rouge_l", "student_ce"), strict=True):
        means = [b[signal]["mean"] for b in buckets]
        low = [b[signal]["mean"] - b[signal]["min"] for b in buckets]
        high = [b[signal]["max"] - b[signal]["mean"] for b in buckets]
        axis.bar(labels, means, yerr=[low, high], color=colors, capsize=4)
        axis.set_title(f"{signal}: mean, min..max")
    for axis in axes:
        axis.set_xlabel("bucket (easy → hard)")
    return figure


def _plot_stage_rows(manifest: dict[str, Any], rank: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    stages = len(manifest["spec"]["distill"]["stages"])
    rows = {b["bucket"]: b["rows"] for b in rank["buckets"]}
    figure, axis = plt.subplots(figsize=(6, 3.5))
    bottoms = [0] * stages
    for bucket in range(stages):
        heights = [rows[bucket] if bucket <= stage else 0 for stage in range(stages)]
        axis.bar([f"stage {s}" for s in range(stages)], heights, bottom=bottoms,
                 color=BUCKET_COLORS[bucket % len(BUCKET_COLORS)], label=f"bucket {bucket}")  # fmt: skip
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    axis.set_ylabel("training rows")
    axis.legend()
    return figure


def _plot_losses(metrics: list[dict[str, Any]]) -> Any:
    import matplotlib.pyplot as plt

    steps = {}
    for record in metrics:
        if "event" not in record:
            steps[record["global_step"]] = record  # a resumed run may log a step twice: keep the last
    figure, axis = plt.subplots(figsize=(7, 4))
    for stage in sorted({r["stage"] for r in steps.values()}):
        records = sorted((r for r in steps.values() if r["stage"] == stage), key=lambda r: r["global_step"])
        x = [r["global_step"] for r in records]
        axis.plot(x, [r["loss"] for r in records], color=BUCKET_COLORS[stage % len(BUCKET_COLORS)],
                  label=f"stage {stage} total")  # fmt: skip
        axis.plot(x, [r["ce"] for r in records], linestyle="--", color=BUCKET_COLORS[stage % len(BUCKET_COLORS)],
                  alpha=0.6, label=f"stage {stage} CE")  # fmt: skip
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (token mean)")
    axis.legend(fontsize=8)
    return figure


def _bucket_table(rank: dict[str, Any]) -> str:
    with_truth = any("mean_true_difficulty" in b for b in rank["buckets"])
    head = "<tr><th>bucket</th><th>kept</th><th>rows</th><th>ROUGE-L mean</th><th>CE mean</th>"
    head += "<th>true difficulty (demo label)</th></tr>" if with_truth else "</tr>"
    body = ""
    for b in rank["buckets"]:
        body += (
            f"<tr><td>{b['bucket']}</td><td>{'yes' if b['kept'] else 'no'}</td><td>{b['rows']}</td>"
            f"<td>{b['rouge_l']['mean']:.3f}</td><td>{b['student_ce']['mean']:.3f}</td>"
        )
        body += f"<td>{b.get('mean_true_difficulty', float('nan')):.2f}</td></tr>" if with_truth else "</tr>"
    return f"<table>{head}{body}</table>"


GROUPS_SHOWN = 40  # a chart of hundreds of tasks reads as nothing: the most-dropped ones


def _groups_section(out: Path, key: str, groups: dict[str, Any], rank: dict[str, Any]) -> str:
    """Rows kept and dropped per task (or stratum) and bucket: the chart (the most-dropped groups) and a
    table of every group."""
    column = groups["column"]
    ordered = sorted(groups["groups"], key=lambda g: (-g["dropped_share"], -g["rows"], str(g["value"])))
    title = f"Rows per {column} and bucket" + (" (stratified)" if key == "strata" else "")
    figure = _plot_groups(ordered[:GROUPS_SHOWN], rank["keep_buckets"])
    body = "".join(
        f"<tr><td>{html.escape(str(g['value']))}</td><td>{g['rows']}</td><td>{g['kept']}</td><td>{g['dropped']}</td>"
        f"<td>{100 * g['dropped_share']:.0f}%</td>"
        + "".join(f"<td>{b['rows']}</td>" for b in g["buckets"]) + "</tr>"
        for g in ordered
    )  # fmt: skip
    head = "<tr><th>" + html.escape(column) + "</th><th>rows</th><th>kept</th><th>dropped</th><th>dropped share</th>"
    head += "".join(f"<th>bucket {b}</th>" for b in range(rank["num_buckets"])) + "</tr>"
    shown = f" (the {GROUPS_SHOWN} most dropped of {len(ordered)})" if len(ordered) > GROUPS_SHOWN else ""
    return _figure(out, f"{key}.png", figure, title + shown) + f"<table>{head}{body}</table>"


def _plot_groups(groups: list[dict[str, Any]], keep_buckets: int) -> Any:
    """Horizontal bars, one per group: its rows in each bucket, dropped buckets hatched."""
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 1.2 + 0.28 * len(groups)))
    labels = [str(g["value"]) for g in groups][::-1]
    lefts = [0] * len(groups)
    for bucket in range(len(groups[0]["buckets"])):
        widths = [g["buckets"][bucket]["rows"] for g in groups][::-1]
        axis.barh(labels, widths, left=lefts, color=BUCKET_COLORS[bucket % len(BUCKET_COLORS)],
                  hatch="//" if bucket >= keep_buckets else None,
                  label=f"bucket {bucket}" + (" (dropped)" if bucket >= keep_buckets else ""))  # fmt: skip
        lefts = [left + width for left, width in zip(lefts, widths, strict=True)]
    axis.set_xlabel("rows")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return figure


def teacher_signal_section(distill: dict[str, Any], signal_record: dict[str, Any]) -> str:
    """Which teacher signal distillation used: the model in every step, or a stored top-k (k, size)."""
    if distill.get("teacher_signal", "online") != "topk":
        return "<h2>Teacher signal</h2><p>online: the teacher model ran in every training step.</p>"
    signal = signal_record.get("summary") or {}
    size_mb = signal.get("stored_bytes", 0) / 2**20
    outside = ", ".join(f"T {t}: {100 * share:.1f}%" for t, share in signal.get("tail_mass", {}).items()) or "-"
    k = signal.get("k")
    if k == "adaptive":  # how many ids a token kept, on average, to cover the coverage
        k = (f"adaptive: {100 * signal.get('coverage', 0):g}% of the mass, at most {signal.get('max_k')} "
             f"({signal.get('ids_per_token')} ids per token)")  # fmt: skip
    return (
        "<h2>Teacher signal</h2><table><tr><th>kind</th><th>k</th><th>log-prob dtype</th><th>rows</th>"
        "<th>response tokens</th><th>stored MB</th><th>bytes per token</th><th>pass wall s</th>"
        "<th>tempered mass outside top k</th></tr>"
        f"<tr><td>top-k</td><td>{k}</td><td>{signal.get('logprob_dtype')}</td><td>{signal.get('rows')}"
        f"</td><td>{signal.get('response_tokens')}</td><td>{size_mb:.1f}</td>"
        f"<td>{signal.get('stored_bytes_per_token')}</td><td>{signal_record.get('wall_s', '-')}</td>"
        f"<td>{outside}</td></tr></table>"
        "<p>Held-out KD losses of this run are measured against the stored top-k signal. The sparse losses see "
        "the teacher's mass outside its top k as one outcome; where a stage's temperature leaves much of it "
        "there, a larger k (or the online teacher) follows the teacher more closely.</p>"
    )


def refresh_line(refresh: dict[str, Any]) -> str:
    """One refresh (rank.refresh: every_stage) in words: how the order of the rows left changed."""
    rouge, ce = refresh["signals"]["rouge_l"], refresh["signals"]["student_ce"]
    return (
        f"refresh before stage {refresh['bucket']} (student after stage {refresh['after_stage']}): "
        f"{refresh['candidates']} rows left, Spearman with the initial order {refresh['spearman_with_initial']:.3f}, "
        f"{refresh['changed_bucket']} changed bucket; admitted ROUGE-L {rouge['admitted_now']:.3f} "
        f"(initially {rouge['admitted_initially']:.3f}), CE {ce['admitted_now']:.3f} "
        f"(initially {ce['admitted_initially']:.3f}); {refresh['generated_tokens']} tokens in "
        f"{refresh['reflect_wall_s']:.1f}s"
    )


def refresh_section(distill: dict[str, Any]) -> str:
    """How each refresh changed the order, and what the refreshes cost."""
    rows = ""
    for r in distill["refresh"]:
        rouge, ce = r["signals"]["rouge_l"], r["signals"]["student_ce"]
        rows += (
            f"<tr><td>{r['bucket']}</td><td>{r['after_stage']}</td><td>{r['candidates']}</td>"
            f"<td>{r['spearman_with_initial']:.3f}</td><td>{r['changed_bucket']}</td>"
            f"<td>{rouge['admitted_now']:.3f} / {rouge['admitted_initially']:.3f} / {rouge['initial_bucket']:.3f}</td>"
            f"<td>{ce['admitted_now']:.3f} / {ce['admitted_initially']:.3f} / {ce['initial_bucket']:.3f}</td>"
            f"<td>{r['generated_tokens']}</td><td>{r['reflect_wall_s']:.1f}</td></tr>"
        )
    cost = distill["refresh_cost"]
    return (
        "<h2>Refreshes (rank.refresh: every_stage)</h2><p>Before each stage but the first, the student as trained "
        "so far re-reflected the rows not yet admitted. Signal means of the admitted bucket: as measured now / "
        "as measured initially / the initial bucket of that index.</p><table><tr><th>bucket</th><th>scored by "
        "the student after stage</th><th>rows left</th><th>Spearman with the initial order</th><th>rows that "
        "changed bucket</th><th>ROUGE-L</th><th>CE</th><th>generated tokens</th><th>reflect s</th></tr>"
        f"{rows}</table><p>Extra generation: {cost['rows_scored']} rows, {cost['generated_tokens']} tokens, "
        f"{cost['reflect_wall_s']:.1f}s.</p>"
    )


def _lm_eval_table(scores: dict[str, Any]) -> str:
    columns = lm_eval_columns(scores)
    head = "<tr><th>model</th>" + "".join(f"<th>{html.escape(f'{t} {m}')}</th>" for t, m in columns) + "</tr>"
    body = ""
    for label, tasks in scores.items():
        cells = "".join(
            f"<td>{100 * tasks[t][m]:.2f}</td>" if m in tasks.get(t, {}) else "<td>-</td>" for t, m in columns
        )
        body += f"<tr><td>{html.escape(label)}</td>{cells}</tr>"
    return f"<h2>Benchmarks (lm-evaluation-harness, x100)</h2><table>{head}{body}</table>"


def _eval_table(evaluation: dict[str, Any]) -> str:
    sets = sorted({name for result in evaluation.values() for name in result})
    head = "<tr><th>model</th>" + "".join(f"<th>{html.escape(s)} ROUGE-L</th>" for s in sets) + "</tr>"
    body = ""
    for label, result in evaluation.items():
        cells = "".join(
            f"<td>{result[s]['rouge_l']:.2f} ± {result[s]['rouge_l_std']:.2f}</td>" if s in result else "<td>-</td>"
            for s in sets
        )
        body += f"<tr><td>{html.escape(label)}</td>{cells}</tr>"
    return f"<h2>Evaluation (ROUGE-L x100, mean ± std over seeds)</h2><table>{head}{body}</table>"
