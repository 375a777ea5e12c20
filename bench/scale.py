"""How cost grows with the data set: the pipeline at 10k, 30k and 100k training rows (#29).

Protocol (results in bench/results/scale.{json,md,png}):

- **Models:** the quickstart's tiny pair, made once (``jobs/quickstart.yaml`` stages prepare and
  teacher_sft, 800 rows) and reused by every size.
- **Data:** the demo generator's world grown to N training rows (``write_demo_data``, seed 0, two
  phrasings of every fact); the evaluation split is fixed: 200 held-out rows of the 10k world for every N.
- **Job:** the quickstart's settings with ``teacher_signal: topk`` (k 64, transformers engine), one
  distill epoch per stage (over 1/4, 2/4, 3/4 of the rows), 2 Train workers of 1 CPU each, batch 32, one
  evaluation seed. Stages reflect, rank, teacher_signal, distill, evaluate, on a private local Ray.
- **Measured:** every 0.5 s, the resident memory (RSS) of the driver (the ``srd run`` process), of each
  engine actor (reflect / teacher pass / evaluate) and of each Train worker; per stage its peak. Per
  stage its wall time per training row (the data set's rows, so a stage that does more per row shows
  it). Ratios are to the smallest size of the same code. Extra Train worker memory per MB of stored
  teacher signal: (worker peak at the largest size - at the smallest) / (signal MB there - here).
- **Side by side:** ``--before`` runs the commit before streaming (#29's first commit) on the same data
  and models, at ``--before-sizes`` (default 10k and 30k: its growth is visible there, and 100k would
  hold the whole signal in every worker).

    python bench/scale.py                      # about 3 hours on 2 cores
    python bench/scale.py --sizes 10000 --before-sizes ''   # one size, this code only
    python bench/scale.py --sizes 10000,100000 --name scale_driver   # results under another name
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import psutil
import yaml
from common import MACHINE

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "bench" / ".cache" / "scale"
SIZES = (10_000, 30_000, 100_000)
EVAL_ROWS = 200
BEFORE_STREAMING = "every Train worker holds every row and the whole signal"
STAGES = ("reflect", "rank", "teacher_signal", "distill", "evaluate")


def job_spec(models: Path, data: dict[str, str], out: Path, name: str) -> dict[str, Any]:
    spec = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    spec["run"].update(name=name, output_dir=str(out))
    for key in ("prepare", "teacher_sft"):
        spec.pop(key, None)
    spec["models"] = {"teacher": {"path": str(models / "teacher")}, "student": {"path": str(models / "student")}}
    spec["data"].update(train={"path": data["train"]}, eval_sets={"demo_heldout": data["heldout"]})
    spec["teacher_signal"] = {"k": 64, "engine": "transformers", "batch_size": 32, "shard_rows": 2048}
    spec["reflect"]["shard_rows"] = 2048
    spec["distill"].update(teacher_signal="topk", num_workers=2, num_cpus_per_worker=1, log_every_steps=200)
    for stage in spec["distill"]["stages"]:
        stage["epochs"] = 1
    spec["evaluate"]["seeds"] = [10]
    return spec


def prepare_models(work: Path) -> Path:
    """The quickstart's tiny pair, the teacher fine-tuned: made once, then read by every size."""
    models = work / "models"
    if (models / "teacher").exists():
        return models
    run = work / "quickstart-run"
    srd(ROOT, ["run", "jobs/quickstart.yaml", "--stages", "prepare,teacher_sft", "--set", f"run.output_dir={run}"])
    (models / "tmp").mkdir(parents=True, exist_ok=True)
    shutil.copytree(run / "quickstart" / "prepare" / "student", models / "tmp" / "student")
    shutil.copytree(run / "quickstart" / "teacher_sft" / "model", models / "tmp" / "teacher")
    for name in ("student", "teacher"):
        (models / "tmp" / name).rename(models / name)
    return models


def prepare_data(work: Path, rows: int) -> dict[str, str]:
    from srd_ray.demo_data import write_demo_data

    fixed_eval = work / "data-eval"
    if not (fixed_eval / "demo_heldout.jsonl").exists():
        write_demo_data(fixed_eval, train_rows=10_000, heldout_rows=EVAL_ROWS, pretrain_rows=0, seed=0)
    out = work / f"data-{rows}"
    if not (out / "demo_train.jsonl").exists():
        write_demo_data(out, train_rows=rows, heldout_rows=0, pretrain_rows=0, seed=0)
    return {"train": str(out / "demo_train.jsonl"), "heldout": str(fixed_eval / "demo_heldout.jsonl")}


def environment(checkout: Path) -> dict[str, str]:
    """The environment an ``srd`` subprocess runs the code at ``checkout`` with."""
    return {**os.environ, "PYTHONPATH": str(checkout), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def srd(checkout: Path, args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "srd_ray.cli", *args], cwd=checkout, env=environment(checkout), check=True)


def role_of(process: psutil.Process, driver: int) -> str | None:
    """driver, engine (a reflect / teacher-pass / evaluate actor) or train_worker; None for Ray's own."""
    if process.pid == driver:
        return "driver"
    try:
        title = " ".join(process.cmdline()[:1])
    except psutil.Error:
        return None
    if "RayTrainWorker" in title:
        return "train_worker"
    if "Engine" in title or "EvalActor" in title:
        return "engine"
    return None


class MemorySampler(threading.Thread):
    """Every ``interval`` seconds the RSS of the driver and its Ray workers, kept as the peak per stage
    (the one run.json says is running), role and process. Also the peak of RSS without shared pages
    (psutil's ``shared``: file-backed and shared-memory pages, the object store's among them), which
    tells a process's own growth from object-store pages it maps."""

    def __init__(self, driver: int, manifest: Path, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.driver, self.manifest, self.interval = driver, manifest, interval
        self.peaks: dict[tuple[str, str, int], int] = defaultdict(int)
        self.private_peaks: dict[tuple[str, str, int], int] = defaultdict(int)
        self.stopping = threading.Event()

    def current_stage(self) -> str | None:
        try:
            stages = json.loads(self.manifest.read_text())["stages"]
        except (OSError, ValueError, KeyError):
            return None
        return next((name for name, record in stages.items() if record.get("status") == "running"), None)

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            stage = self.current_stage()
            try:
                processes = [psutil.Process(self.driver), *psutil.Process(self.driver).children(recursive=True)]
            except psutil.Error:
                continue
            for process in processes:
                role = role_of(process, self.driver)
                if role is None or stage is None:
                    continue
                try:
                    memory = process.memory_info()
                except psutil.Error:
                    continue
                key = (stage, role, process.pid)
                self.peaks[key] = max(self.peaks[key], memory.rss)
                private = memory.rss - getattr(memory, "shared", 0)
                self.private_peaks[key] = max(self.private_peaks[key], private)

    def by_stage(self) -> dict[str, dict[str, Any]]:
        """Per stage and role: the peak RSS in MB (max over processes), each process's peak, and the peak
        without shared pages."""
        result: dict[str, dict[str, Any]] = defaultdict(dict)
        for (stage, role, pid), rss in sorted(self.peaks.items()):
            entry = result[stage].setdefault(role, {"peak_mb": 0.0, "each_mb": [], "peak_private_mb": 0.0})
            entry["each_mb"].append(round(rss / 2**20, 1))
            entry["peak_mb"] = max(entry["peak_mb"], round(rss / 2**20, 1))
            private = round(self.private_peaks[(stage, role, pid)] / 2**20, 1)
            entry["peak_private_mb"] = max(entry["peak_private_mb"], private)
        return dict(result)


def run_size(checkout: Path, code: str, rows: int, models: Path, work: Path, commit: str) -> dict[str, Any]:
    """One pipeline at ``rows`` training rows by the code at ``checkout`` (``commit``): walls and sampled
    memory. A cached result is reused only if the same commit made it."""
    cached = work / "runs" / f"{code}-{rows}.json"
    if cached.exists() and json.loads(cached.read_text()).get("commit") == commit:
        return json.loads(cached.read_text())
    data = prepare_data(work, rows)
    out = work / "runs" / f"{code}-{rows}"
    shutil.rmtree(out, ignore_errors=True)  # memory is sampled over one uninterrupted run: start afresh
    out.mkdir(parents=True)
    spec_path = out / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(job_spec(models, data, out, "scale")))
    args = [sys.executable, "-m", "srd_ray.cli", "run", str(spec_path), "--stages", ",".join(STAGES)]
    with open(out / "console.log", "w") as console:
        job = subprocess.Popen(args, cwd=checkout, env=environment(checkout), stdout=console, stderr=subprocess.STDOUT)
        sampler = MemorySampler(job.pid, out / "scale" / "run.json")
        sampler.start()
        status = job.wait()
        sampler.stopping.set()
        sampler.join()
    if status != 0:
        raise SystemExit(f"{code} at {rows} rows failed (exit {status}); see {out / 'console.log'}")
    manifest = json.loads((out / "scale" / "run.json").read_text())
    signal = manifest["stages"]["teacher_signal"]["summary"]
    result = {
        "code": code, "commit": commit, "rows": rows, "memory": sampler.by_stage(),
        "wall_s": {stage: manifest["stages"][stage]["wall_s"] for stage in STAGES},
        "signal_mb": round(signal["stored_bytes"] / 2**20, 1), "signal_rows": signal["rows"],
        "optimizer_steps": manifest["stages"]["distill"]["summary"]["optimizer_steps"],
    }  # fmt: skip
    cached.write_text(json.dumps(result, indent=2))
    return result


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per result, its memory and time per row as ratios to the smallest size of the same code."""
    out = []
    for result in results:
        base = min((r for r in results if r["code"] == result["code"]), key=lambda r: r["rows"])
        entry: dict[str, Any] = {"code": result["code"], "rows": result["rows"], "time_per_row": {}, "memory": {}}
        for stage in STAGES:
            per_row, base_per_row = result["wall_s"][stage] / result["rows"], base["wall_s"][stage] / base["rows"]
            entry["time_per_row"][stage] = round(per_row / base_per_row, 2)
            for role, memory in result["memory"].get(stage, {}).items():
                base_peak = base["memory"].get(stage, {}).get(role, {}).get("peak_mb")
                if base_peak:
                    entry["memory"][f"{stage}/{role}"] = round(memory["peak_mb"] / base_peak, 2)
        out.append(entry)
    return out


def worker_mb_per_signal_mb(results: list[dict[str, Any]], code: str) -> float | None:
    mine = sorted((r for r in results if r["code"] == code), key=lambda r: r["rows"])
    if len(mine) < 2:
        return None
    small, large = mine[0], mine[-1]
    worker = [r["memory"]["distill"]["train_worker"]["peak_mb"] for r in (small, large)]
    return round((worker[1] - worker[0]) / (large["signal_mb"] - small["signal_mb"]), 3)


def memory_cell(memory: dict[str, Any], role: str, each: bool = False) -> str:
    """A role's peak RSS in MB, with each process's peak in brackets when ``each``."""
    if role not in memory:
        return "-"
    peak = f"{memory[role]['peak_mb']:.0f}"
    return f"{peak} ({', '.join(f'{mb:.0f}' for mb in memory[role]['each_mb'])})" if each else peak


def markdown(summary: dict[str, Any], name: str = "scale") -> str:
    results = summary["results"]
    lines = [
        "# Cost against data set size (#29)", "",
        f"Machine: {summary['machine']}. Protocol: the `bench/scale.py` docstring (tiny pair, topk k 64, one "
        f"epoch per stage, 2 Train workers). Codes: `after` = {summary['after']}, `before` = {summary['before']} "
        f"({summary.get('before_is', BEFORE_STREAMING)}). Models: {summary['models']}.", "",
        "## Wall time per training row (ms)", "",
        "| code | rows | " + " | ".join(STAGES) + " | signal MB | steps |",
        "|---|---|" + "---|" * len(STAGES) + "---|---|",
    ]  # fmt: skip
    for r in results:
        per_row = " | ".join(f"{1000 * r['wall_s'][s] / r['rows']:.2f}" for s in STAGES)
        lines.append(f"| {r['code']} | {r['rows']} | {per_row} | {r['signal_mb']} | {r['optimizer_steps']} |")
    lines += ["", "## Peak RSS per stage and role (MB; each Train worker's in brackets)", "",
              "| code | rows | stage | driver | engine actors | Train workers |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        for stage in STAGES:
            memory = r["memory"].get(stage, {})
            cells = [memory_cell(memory, "driver"), memory_cell(memory, "engine"),
                     memory_cell(memory, "train_worker", each=True)]  # fmt: skip
            lines.append(f"| {r['code']} | {r['rows']} | {stage} | " + " | ".join(cells) + " |")
    lines += ["", "## Ratios to the smallest size of the same code", "",
              "| code | rows | time per row (per stage) | peak RSS (stage/role) |", "|---|---|---|---|"]  # fmt: skip
    for entry in summary["ratios"]:
        times = ", ".join(f"{s} {v:.2f}x" for s, v in entry["time_per_row"].items())
        memory = ", ".join(f"{k} {v:.2f}x" for k, v in entry["memory"].items())
        lines.append(f"| {entry['code']} | {entry['rows']} | {times} | {memory} |")
    lines += private_memory_lines(results)
    per_signal = ", ".join(f"{code} {value} MB/MB" for code, value in summary["worker_mb_per_signal_mb"].items())
    lines += ["", f"Extra Train worker memory per MB of stored teacher signal (smallest to largest size): {per_signal}",
              "", f"![peak RSS and time per row against rows]({name}.png)"]  # fmt: skip
    return "\n".join(lines) + "\n"


def private_memory_lines(results: list[dict[str, Any]]) -> list[str]:
    """The driver's peak RSS without shared pages, per stage (runs sampled before it was recorded have none)."""
    sampled = [r for r in results if any("peak_private_mb" in m.get("driver", {}) for m in r["memory"].values())]
    if not sampled:
        return []
    lines = ["", "## Driver peak RSS without shared pages (MB)", "", "| code | rows | " + " | ".join(STAGES) + " |",
             "|---|---|" + "---|" * len(STAGES)]  # fmt: skip
    for r in sampled:
        peaks = [r["memory"].get(stage, {}).get("driver", {}).get("peak_private_mb") for stage in STAGES]
        cells = ["-" if mb is None else f"{mb:.0f}" for mb in peaks]
        lines.append(f"| {r['code']} | {r['rows']} | " + " | ".join(cells) + " |")
    return lines


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory_axes, time_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for code in sorted({r["code"] for r in summary["results"]}):
        mine = sorted((r for r in summary["results"] if r["code"] == code), key=lambda r: r["rows"])
        rows = [r["rows"] for r in mine]
        style = "-" if code == "after" else "--"
        for stage, role in (("distill", "train_worker"), ("distill", "driver"), ("teacher_signal", "engine")):
            peaks = [r["memory"].get(stage, {}).get(role, {}).get("peak_mb") for r in mine]
            memory_axes.plot(rows, peaks, style, marker="o", label=f"{code}: {stage} {role}")
        for stage in STAGES:
            time_axes.plot(rows, [1000 * r["wall_s"][stage] / r["rows"] for r in mine], style, marker="o",
                           label=f"{code}: {stage}")  # fmt: skip
    for axes, label in ((memory_axes, "peak RSS (MB)"), (time_axes, "wall ms per training row")):
        axes.set_xscale("log")
        axes.set_xlabel("training rows")
        axes.set_ylabel(label)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--before", default="7b1073e", help="the commit before streaming")
    parser.add_argument("--before-is", default=BEFORE_STREAMING, help="what the before code is, for the results")
    parser.add_argument("--before-sizes", default="10000,30000", help="sizes the before code runs ('' for none)")
    parser.add_argument("--name", default="scale", help="results file name: bench/results/<name>.{json,md,png}")
    parser.add_argument(
        "--models",
        type=Path,
        help="a folder with teacher/ and student/ to use as they are "
        "(the results say so) instead of making the quickstart pair and fine-tuning its teacher",
    )
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    models = args.models.resolve() if args.models else prepare_models(CACHE)
    after = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    results = [run_size(ROOT, "after", int(n), models, CACHE, after.stdout.strip()) for n in args.sizes.split(",") if n]
    before_sizes = [int(n) for n in args.before_sizes.split(",") if n]
    if before_sizes:
        checkout = Path(tempfile.mkdtemp(prefix="scale-before-")) / "checkout"
        subprocess.run(["git", "worktree", "add", "--detach", str(checkout), args.before], cwd=ROOT, check=True)
        try:
            results += [run_size(checkout, "before", n, models, CACHE, args.before) for n in before_sizes]
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(checkout)], cwd=ROOT, check=False)
    codes = sorted({r["code"] for r in results})
    summary = {
        "machine": MACHINE,
        "after": after.stdout.strip(), "before": args.before if before_sizes else None, "before_is": args.before_is,
        "models": str(models) if args.models else "the quickstart pair, teacher fine-tuned",
        "results": results, "ratios": ratios(results),
        "worker_mb_per_signal_mb": {code: worker_mb_per_signal_mb(results, code) for code in codes},
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(summary, args.name))
    plot(summary, RESULTS / f"{args.name}.png")
    print(markdown(summary))


if __name__ == "__main__":
    main()
