"""How fast, and how clearly, a run that asks for more than the cluster has is refused: before vs after.

Protocol (results in bench/results/preflight.{json,md}): each case is ``srd run`` of the quickstart on
its prepared data and models (the prepare stage run once beforehand; no teacher SFT) with one setting
changed, on a private local Ray (this machine: 2 CPUs, no GPU), run by the code at ``--before`` (a git
worktree of the commit before the resource preflight) and by this checkout, side by side, each stopped
after ``--limit`` seconds (the old code must get through reflect to reach distill). Reported: the exit
status (or "hung" when stopped at the limit), the seconds until it ended, whether anything was written to
the run directory, and the last line printed.

- ``reflect_gpu``: ``reflect.num_gpus_per_actor=1`` (reflect asks for a GPU this machine does not have);
- ``mixed_generation``: ``distill.student_generation.mode=mixed`` with vLLM installed (a generation actor
  beside the Train worker that holds both CPUs: review F4's CPU form);
- ``distill_gpu``: ``distill.use_gpu=true``.

    python bench/preflight.py        # about 20 minutes on 2 cores (the old code runs until its limit)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import MACHINE, save_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CASES = {
    "reflect_gpu": ["reflect.num_gpus_per_actor=1"],
    "mixed_generation": ["distill.student_generation.mode=mixed", "distill.loss=jsd"],
    "distill_gpu": ["distill.use_gpu=true"],
}


def prepared_spec(work: Path) -> Path:
    """The quickstart on its prepared data and models (the prepare stage run once, by this checkout), so
    that both codes reach the stage that asks for too much instead of spending the limit preparing."""
    prepared = work / "quickstart"
    if not (prepared / "prepare" / "student" / "config.json").exists():
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, "-m", "srd_ray.cli", "run", "jobs/quickstart.yaml", "--stages", "prepare",
                        "--set", f"run.output_dir={work}"], cwd=ROOT, env=env, check=True)  # fmt: skip
    spec = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    spec.pop("prepare")
    spec["teacher_sft"] = {"enabled": False}  # the untuned teacher: its quality is not what is measured
    spec["models"] = {role: {"path": str(prepared / "prepare" / role)} for role in ("teacher", "student")}
    spec["data"]["train"]["path"] = str(prepared / "prepare" / "demo_train.jsonl")
    spec["data"]["eval_sets"] = {"demo_heldout": str(prepared / "prepare" / "demo_heldout.jsonl")}
    path = work / "prepared.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_case(checkout: Path, spec: Path, settings: list[str], limit: float) -> dict:
    out = Path(tempfile.mkdtemp(prefix="preflight-"))
    args = [sys.executable, "-m", "srd_ray.cli", "run", str(spec), "--set", f"run.output_dir={out}"]
    args += [word for setting in settings for word in ("--set", setting)]
    env = {**os.environ, "PYTHONPATH": str(checkout), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    job = subprocess.Popen(args, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)  # fmt: skip
    try:
        output, _ = job.communicate(timeout=limit)
        status: int | str = job.returncode
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, 9)
        output, status = job.communicate()[0], "hung"
    seconds = round(time.perf_counter() - started, 1)
    lines = [line for line in output.splitlines() if line.strip()]
    return {"status": status, "seconds": seconds, "wrote_run_dir": (out / "quickstart").exists(),
            "last_line": lines[-1][:300] if lines else ""}  # fmt: skip


def markdown(results: dict) -> str:
    lines = [
        "# Resource preflight: a run that asks for more than the cluster has", "",
        f"Machine: {results['machine']}. Protocol: the `bench/preflight.py` docstring; before = {results['before']}, "
        f"each run stopped after {results['limit']} s.", "",
        "| case | code | exit | seconds | wrote the run directory | last line |", "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for case, sides in results["cases"].items():
        for side in ("before", "after"):
            r = sides[side]
            lines.append(f"| {case} | {side} | {r['status']} | {r['seconds']} | {'yes' if r['wrote_run_dir'] else 'no'}"
                         f" | {r['last_line'].replace('|', '/')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default="cb4ce52", help="the commit before the resource preflight")
    parser.add_argument("--limit", type=float, default=300.0, help="seconds before a run counts as hung")
    args = parser.parse_args()
    before = Path(tempfile.mkdtemp(prefix="preflight-before-")) / "checkout"
    subprocess.run(["git", "worktree", "add", "--detach", str(before), args.before], cwd=ROOT, check=True)
    try:
        spec = prepared_spec((ROOT / "bench" / ".cache" / "preflight").resolve())
        cases = {name: {side: run_case(checkout, spec, settings, args.limit)
                        for side, checkout in (("before", before), ("after", ROOT))}
                 for name, settings in CASES.items()}  # fmt: skip
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    results = {"machine": MACHINE, "before": args.before,
               "limit": args.limit, "cases": cases}  # fmt: skip
    save_results("preflight", results, markdown(results))


if __name__ == "__main__":
    main()
