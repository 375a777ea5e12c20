"""On-policy distillation (student generation): how fast the student's samples come, and what GKD gives
with and without the SRD curriculum.

Protocol, fixed before running (results in bench/results/on_policy.{json,md}):

1. **Generation speed.** ``student_generation.mode: on`` (every step trains on fresh samples), jsd, one
   training stage of ``--speed-steps`` steps on the pair's training rows, batch and token limits as in
   ``bench/srd_vs_kd.py``. Two engines at equal settings (temperature 1, up to ``max_response_tokens``)
   and equal CPUs (the whole machine for each phase of a step):
   - ``vllm``: one vLLM generation actor fed the trained weights before every step. Generating and
     training take turns within a step, so the actor and the training worker are each given both cores
     (Ray is told of 4 logical CPUs: 2 for the worker, 2 for the actor);
   - ``transformers``: the release's way, ``generate`` inside the training worker (2 CPUs).
   Reported: steps/s over the training loop (setup excluded), and the loop's split into generating,
   syncing weights and training, from the per-step metrics. ``--speed-response-tokens N`` runs the same
   comparison with up to N sampled tokens (the SRD release samples up to 256).
1b. **Weight sync, piece by piece** (``--parts sync``): the pair's student, one vLLM generation actor (2
   CPUs), ``--sync-repeats`` syncs per transport after one warm-up: gathering the state dict, ``ray.put``,
   and the actor's call split into the engine's own loading and the rest (transport: fetching and
   deserialising). Transports: the state dict of torch tensors as is (pickled) and ``PackedWeights``
   (NumPy arrays, mapped from the object store without a copy).
2. **Method results.** GKD (``mixed``, mixed_alpha 0.5, generalised JSD with jsd_beta 0.9, replay buffer of
   1000 rows; vLLM generation actors where vLLM is installed, given CPUs as above) as KD (``curriculum:
   none``, epochs as the KD baseline) and as SRD (3 stages over 1/4, 2/4, 3/4 of the rows), training
   seeds 0, 1, 2, on the tiny pair; ROUGE-L x100 on the demo's held-out split
   and the real sets, wall times; next to the off-policy fkl rows of bench/results/srd_vs_kd_tiny.json.

    python bench/on_policy.py                 # both parts, tiny pair: about 30 minutes on 2 cores
    python bench/on_policy.py --parts speed   # only the generation speed
    python bench/on_policy.py --pair smollm2 --parts speed --speed-steps 20   # about 8 minutes
    python bench/on_policy.py --pair smollm2 --parts sync                      # about 2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import (  # noqa: E402  (the shared pair settings, run helpers and tables)
    MACHINE,
    RESULTS,
    base_scores,
    compared_spec,
    mean_std,
    pair_settings,
    prepare_base,
    run_record,
    srd,
    write_spec,
)

SEEDS = [0, 1, 2]
GKD = {"mode": "mixed", "mixed_alpha": 0.5, "replay_capacity": 1000, "generation_temperature": 1.0}


def metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if "event" not in row]


# --------------------------------------------------------------------------------------------------------
# 1. Generation speed


def speed_spec(base: dict, settings: dict, work: Path, engine: str, steps: int) -> dict[str, Any]:
    spec = compared_spec(base, settings, work, "jsd", 0, "none")
    spec["run"]["name"] = speed_run(settings, engine)
    spec["data"]["max_response_tokens"] = settings["data"]["max_response_tokens"]  # --speed-response-tokens
    distill = spec["distill"]
    distill["stages"] = [{"steps": steps, "kd_weight": 1.0, "temperature": 1.0, "lr": settings["distill"]["lr"]}]
    distill["log_every_steps"] = 1
    distill["student_generation"] = {"mode": "on", "engine": engine}
    return with_generation_cpus(spec)


def with_generation_cpus(spec: dict[str, Any]) -> dict[str, Any]:
    """The training worker and a vLLM generation actor take turns within a step: 2 logical CPUs each, on
    the machine's 2 cores (the in-worker engine needs nothing extra)."""
    generation = spec["distill"]["student_generation"]
    if generation["engine"] != "transformers":
        spec["ray"] = {**spec.get("ray", {}), "num_cpus": 4}
        generation["num_cpus_per_actor"] = 2
    spec["distill"]["num_cpus_per_worker"] = 2
    return spec


def speed_run(settings: dict, engine: str) -> str:
    return f"speed-{engine}-{settings['data']['max_response_tokens']}-tokens"


def speed(base: dict, settings: dict, work: Path, steps: int) -> dict[str, Any]:
    results = {}
    for engine in ("vllm", "transformers"):
        path = write_spec(speed_spec(base, settings, work, engine, steps), work)
        srd("run", str(path), "--stages", "distill")
        rows = metric_rows(work / speed_run(settings, engine))
        # Each logged step's window covers that one step (log_every_steps 1); the first step also pays
        # the generation actor's start-up wait and the first sync, so it is reported apart.
        split = {key: sum(row[key] for row in rows[1:]) for key in ("generate_s", "sync_s", "train_s")}
        loop_s = sum(split.values())
        results[engine] = {
            "steps": len(rows),
            "steps_per_s": (len(rows) - 1) / loop_s,
            "loop_s": loop_s,
            **split,
            "first_step_s": rows[0]["generate_s"] + rows[0]["sync_s"] + rows[0]["train_s"],
            "tokens_per_step": rows[-1]["tokens_seen"] / len(rows),
        }
        print(f"[on_policy] {engine}: {results[engine]}", flush=True)
    results["vllm_over_transformers"] = results["vllm"]["steps_per_s"] / results["transformers"]["steps_per_s"]
    return results


def sync_breakdown(work: Path, repeats: int) -> dict[str, Any]:
    import ray

    from srd_ray.distill.strategy import full_state_dict
    from srd_ray.distill.student_generation import GenerationActor, PackedWeights
    from srd_ray.models import load_model
    from srd_ray.spec import load_spec

    class TensorDictActor(GenerationActor):
        def load_tensors(self, weights: dict) -> float:
            started = time.perf_counter()
            self.engine.load_weights(weights)
            return time.perf_counter() - started

    spec = load_spec(next((work / "specs").glob("speed-vllm*.yaml")))
    student = load_model(spec.models.student)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        actor = (
            ray.remote(TensorDictActor)
            .options(num_cpus=2)
            .remote("vllm", spec.models.student, spec.data, spec.distill.student_generation, spec.engine.vllm)
        )
        ray.get(actor.__ray_ready__.remote())
        results = {}
        for transport in ("torch", "numpy"):
            samples = []
            for _ in range(repeats + 1):  # the first warms up
                started = time.perf_counter()
                weights = full_state_dict(student)
                gathered = time.perf_counter()
                reference = ray.put(PackedWeights.of(weights) if transport == "numpy" else weights)
                put = time.perf_counter()
                call = actor.load_weights if transport == "numpy" else actor.load_tensors
                load_s = ray.get(call.remote(reference))
                done = time.perf_counter()
                del reference
                samples.append({"gather_s": gathered - started, "put_s": put - gathered, "load_s": load_s,
                                "transport_s": done - put - load_s, "total_s": done - started})  # fmt: skip
            results[transport] = {key: statistics.fmean(s[key] for s in samples[1:]) for key in samples[0]}
            print(f"[on_policy] sync via {transport}: {results[transport]}", flush=True)
    finally:
        ray.shutdown()
    megabytes = sum(t.numel() * t.element_size() for t in weights.values()) / 2**20
    return {"repeats": repeats, "state_dict_mb": megabytes, **results}


# --------------------------------------------------------------------------------------------------------
# 2. Method results


def gkd_spec(base: dict, settings: dict, work: Path, seed: int, curriculum: str) -> dict[str, Any]:
    spec = compared_spec(base, settings, work, "jsd", seed, curriculum)
    spec["run"]["name"] = f"gkd-{'srd' if curriculum == 'srd' else 'kd'}-seed{seed}"
    spec["distill"]["student_generation"] = {**GKD, "engine": "auto"}
    return with_generation_cpus(spec)


def method_record(run_dir: Path) -> dict[str, Any]:
    record = run_record(run_dir)
    record["average"] = statistics.fmean(record["scores"].values())
    sources: dict[str, int] = {}
    for row in metric_rows(run_dir):
        for name, count in row.get("sources", {}).items():
            sources[name] = sources.get(name, 0) + count
    record["sources"] = sources
    record["generate_s"] = sum(row.get("generate_s", 0.0) for row in metric_rows(run_dir))
    return record


def methods(base: dict, settings: dict, work: Path) -> dict[str, Any]:
    for seed in SEEDS:
        for curriculum in ("none", "srd"):
            srd("run", str(write_spec(gkd_spec(base, settings, work, seed, curriculum), work)))
    runs = {method: [method_record(work / f"gkd-{method}-seed{seed}") for seed in SEEDS] for method in ("kd", "srd")}
    off_policy = RESULTS / "srd_vs_kd_tiny.json"
    return {"gkd": runs, "off_policy_fkl": json.loads(off_policy.read_text())["losses"]["fkl"]}


# --------------------------------------------------------------------------------------------------------
# Report


def speed_markdown(by_pair: dict[str, Any]) -> list[str]:
    lines = [
        "## Generation speed (`mode: on`, jsd)",
        "",
        "Loop and its split: every step but the first (which also waits for the generation actor to start).",
        "",
        "| pair | engine | steps/s | loop s | generate s | sync s | train s | first step s | tokens/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for pair, results in by_pair.items():
        for engine in ("vllm", "transformers"):
            r = results[engine]
            lines.append(
                f"| {pair} | {engine} | {r['steps_per_s']:.3f} | {r['loop_s']:.1f} | {r['generate_s']:.1f} "
                f"| {r['sync_s']:.2f} | {r['train_s']:.1f} | {r['first_step_s']:.1f} | {r['tokens_per_step']:.0f} |"
            )
    lines.append("")
    for pair, results in by_pair.items():
        ratio = results["vllm_over_transformers"]
        lines.append(f"- {pair}: vLLM actor over in-worker `generate`: **{ratio:.2f}x** steps/s.")
    return [*lines, ""]


def sync_markdown(by_pair: dict[str, Any]) -> list[str]:
    lines = ["## Weight sync, piece by piece (one vLLM actor; mean of the repeats after a warm-up)", "",
             "| pair | state dict MB | transport | gather s | ray.put s | fetch + deserialise s | engine load s "
             "| total s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for pair, result in by_pair.items():
        for transport in ("torch", "numpy"):
            r = result[transport]
            cells = [r[key] for key in ("gather_s", "put_s", "transport_s", "load_s", "total_s")]
            lines.append(f"| {pair} | {result['state_dict_mb']:.0f} | {transport} | "
                         + " | ".join(f"{cell:.3f}" for cell in cells) + " |")  # fmt: skip
    return [*lines, ""]


def methods_markdown(results: dict[str, Any]) -> list[str]:
    sets = sorted(results["reference"]["teacher"])
    lines = [
        f"## GKD (mixed, jsd) with and without the SRD curriculum, next to off-policy fkl ({results['pair']} pair)",
        "",
        "ROUGE-L x100, mean ± std over training seeds; off-policy rows from bench/results/srd_vs_kd_tiny.json.",
        "",
        "| model | " + " | ".join(sets) + " | average | train s | end-to-end s | steps | sampled steps |",
        "|---|" + "---|" * (len(sets) + 5),
    ]
    rows = [(f"GKD {m.upper()}", results["gkd"][m]) for m in ("kd", "srd")]
    rows += [(f"off-policy {m.upper()} fkl", results["off_policy_fkl"][m]) for m in ("kd", "srd")]
    for label, runs in rows:
        cells = []
        for name in [*sets, "average"]:
            mean, std = mean_std([run["scores"][name] if name != "average" else run["average"] for run in runs])
            cells.append(f"{mean:.2f} ± {std:.2f}")
        timings = [statistics.fmean(run[key] for run in runs) for key in ("train_wall_s", "end_to_end_s")]
        sampled = runs[0].get("sources", {}).get("buffer", "")
        lines.append(
            f"| {label} | " + " | ".join(cells)
            + f" | {timings[0]:.1f} | {timings[1]:.1f} | {runs[0]['optimizer_steps']} | {sampled} |"
        )  # fmt: skip
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--parts", default="speed,methods")
    parser.add_argument("--speed-steps", type=int, default=30)
    parser.add_argument("--speed-response-tokens", type=int, help="sample up to this many tokens (default: the pair's)")
    parser.add_argument("--sync-repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parts = args.parts.split(",")
    work = (ROOT / "bench" / ".cache" / "on_policy" / args.pair).resolve()
    settings = pair_settings(args.pair, ROOT / "bench" / ".cache")
    base = prepare_base(settings, work)
    path = RESULTS / "on_policy.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = MACHINE
    if "speed" in parts:  # per pair and response length
        key = args.pair
        if args.speed_response_tokens:
            settings["data"]["max_response_tokens"] = args.speed_response_tokens
            key = f"{args.pair}, {args.speed_response_tokens} tokens"
        results["speed"] = {**results.get("speed", {}), key: speed(base, settings, work, args.speed_steps)}
    if "sync" in parts:
        results["sync"] = {**results.get("sync", {}), args.pair: sync_breakdown(work, args.sync_repeats)}
    if "methods" in parts:
        results["methods"] = {"pair": args.pair, **methods(base, settings, work), "reference": base_scores(work)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# On-policy distillation", "", f"Machine: {results['machine']}. Protocol: `bench/on_policy.py`.", ""]
    if "speed" in results:
        lines += speed_markdown(results["speed"])
    if "sync" in results:
        lines += sync_markdown(results["sync"])
    if "methods" in results:
        lines += methods_markdown(results["methods"])
    (RESULTS / "on_policy.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
