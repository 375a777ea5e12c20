"""The teacher signal computed once (top-k) vs the online teacher, and how good the top-k approximation is.

Protocol, fixed before running (results in bench/results/teacher_signal.{json,md}):

1. **Approximation table.** On the first 32 rows of the demo's held-out split, with each pair's fine-tuned
   teacher and untrained student: for every divergence, T in {1, 2} and k in {8, 32, 64, 128}, the mean
   over response tokens of |KD_exact - KD_topk| (next to the mean KD_exact), and the relative error of the
   gradient with respect to the student's logits, ||g_topk - g_exact|| / ||g_exact|| over all tokens.
   KD_topk uses the signal as the teacher pass stores it (float16 log-probs, exact tail mass).
2. **The same SRD job, online vs topk (k 64)**, fkl, on each pair (``bench/srd_vs_kd.py``'s settings: SRD
   3 stages over 1/4, 2/4, 3/4 of the rows, the release's kd_weight / temperature), training seeds 0, 1, 2
   (``--seeds`` adds more: on SmolLM2, seeds 3, 4, 5 were added after the 10-sampling-seed check of part 4
   left the demo held-out gap undecided; their timings were measured on the same quiet machine).
   Both signals share every other input; each run does reflect + rank (+ teacher pass) + distill +
   evaluate. Reported: distill training wall and tokens/s (whole stage and steady, the median of the
   logged windows), the teacher pass's wall, end-to-end (reflect + rank + teacher pass + distill), and
   ROUGE-L x100 on the demo held-out split and the real sets (mean ± std over seeds, and the paired
   difference topk - online).
3. **FLOPs.** Per training token, student-only (6 N_s) vs student + teacher forward (6 N_s + 2 N_t), with
   N the matmul parameters (decoder layers + output head) of each pair; and a projection to the paper's
   GPT-2 setting (11.4k rows, 8 epochs per stage over 1/4, 1/2, 3/4 of them, GPT-2 XL 1.5B -> GPT-2
   124M, the real Dolly rows' measured mean length).

    python bench/teacher_signal.py --pair tiny        # about 20 minutes on 2 cores
    python bench/teacher_signal.py --pair smollm2     # about 90 minutes on 2 cores
    python bench/teacher_signal.py --summarize        # the markdown from both pairs' JSON
    python bench/teacher_signal.py --pair smollm2 --seeds 0,1,2,3,4,5   # 3 more seeds: about 45 minutes

4. **More evaluation seeds on the demo held-out split** (added after the first SmolLM2 run, whose 60-row,
   2-seed paired difference there had a std of 2.45): each of the 6 trained students is evaluated again on
   all 60 held-out rows with the 10 sampling seeds 10, 20, ..., 100 (the first two repeat the run's own),
   same generation settings. Reported next to the run's table: mean ± std over training seeds of the
   10-seed means, the paired topk - online difference, and the eval-seed noise (the std over the 10 seeds
   of one student's per-seed mean, averaged over students).

    python bench/teacher_signal.py --pair smollm2 --more-demo-seeds   # about 10 minutes on 2 cores

5. **Where the tail is heavy** (added after ``bench/srd_evidence.py``'s ``srd_topk`` runs put the demo
   held-out gap in two of its four tasks): per demo task, on all 60 held-out rows with the fine-tuned
   SmolLM2 teacher and the healed 12-layer student, the teacher's mean mass outside its top 64 and top
   256 at T 1, and the relative error sum|KD_topk - KD_exact| / sum KD_exact of fkl at k 64, T 1 and 2.

    python bench/teacher_signal.py --tail-by-task     # about 3 minutes on 2 cores

6. **Stored tempered tails** (added after part 5): the teacher pass now also stores, per token, the exact
   tempered tail mass log Σ_tail p^(1/T) at each training temperature T != 1, which the loss uses instead
   of extrapolating it from the top k. Parts 1 and 5 were rerun with it (the extrapolated tail is kept as
   a column: it is what the vLLM engine stores, and what every topk run of part 2 trained with).

    python bench/teacher_signal.py --pair tiny --approximation      # seconds
    python bench/teacher_signal.py --pair smollm2 --approximation   # about 2 minutes on 2 cores

   Then the same SRD job again with the stored tails (run label ``topk_tail``, the same spec as ``topk``;
   the teacher pass now runs the transformers engine by default, which stores them, where the topk runs'
   pass ran vLLM), paired with the same online runs, and part 4 for its students:

    python bench/teacher_signal.py --pair smollm2 --seeds 0,1,2,3,4,5 --signals topk_tail
    python bench/teacher_signal.py --pair smollm2 --more-demo-seeds

   Label ``topk1024`` is ``topk_tail`` with k 1024 (added after part 7 and the healed runs of
   ``srd_evidence.py``): ``--signals topk1024``.

7. **The tail after training** (added after ``srd_evidence.py``'s ``srd_topk_tail`` runs tied
   ``srd_topk``): on all 60 demo held-out rows, the fine-tuned SmolLM2 teacher against the healed
   student as online SRD trained it (run srd-seed0): at T 1, 1.5 and 2 and k 64, 256 and 1024, the
   teacher's mean tempered mass outside its top k, and fkl's KD and gradient relative errors with stored
   tails. (Against the untrained student of part 5 the T 2 gradient error looked small; a student close
   to its teacher is what training meets in the later stages.)

    python bench/teacher_signal.py --tail-after-training      # about 4 minutes on 2 cores

8. **The signals timed side by side** (added when the topk1024 runs of part 6, trained in a later session
   than the online runs they pair with, came out faster than the FLOP bound allows): online, topk_tail
   (k 64) and topk1024 retrained as runs named ``timed-<label>-seed<seed>``, interleaved seed by seed in
   one invocation on an otherwise idle machine, so that every speed ratio compares runs made under the
   same conditions. Same table as part 2, written under ``side_by_side`` in the pair's JSON.

    python bench/teacher_signal.py --pair smollm2 --side-by-side --seeds 0,1,2 --signals online,topk_tail,topk1024
    # about 50 minutes on 2 cores

9. **Adaptive k** (``teacher_signal.k: adaptive``, #29): part 7's setting (the healed experiment's
   teacher against its SRD-trained student, 60 demo held-out rows) for fixed k 64, 256, 1024 and adaptive
   k with max_k 1024 at coverage 0.9, 0.95, 0.99 of the mass tempered at T 2 (the hottest stage: the
   default) and 0.99, 0.999 of the mass at T 1: mean ids and raw bytes per response token, fkl's KD and
   gradient relative errors at T 1, 1.5 and 2.

    python bench/teacher_signal.py --adaptive      # about 5 minutes on 2 cores (needs srd_evidence healed)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from common import (  # noqa: E402  (the shared pair settings, run helpers and tables)
    MACHINE,
    RESULTS,
    SHARED_EVAL,
    base_scores,
    compared_spec,
    evaluated,
    mean_std,
    pair_settings,
    prepare_base,
    save_results,
    srd,
    write_spec,
)

SEEDS = [0, 1, 2]
K = 64
# Run label -> (distill.teacher_signal, k). topk runs were made while the loss extrapolated the tempered tail;
# topk_tail runs (protocol part 6) with the tail's tempered mass stored by the pass. Same settings.
# topk1024: topk_tail with k 1024 (added after srd_evidence.py's healed runs, where k 64 lost on the demo
# split at T 2 and k 1024 did not).
SIGNALS = {"online": ("online", K), "topk": ("topk", K), "topk_tail": ("topk", K), "topk1024": ("topk", 1024)}
KS = [8, 32, 64, 128]
APPROXIMATION_ROWS = 32
EVAL = {"tiny": {"eval_rows": 100, "eval_seeds": [10, 20, 30]}, "smollm2": {"eval_rows": 60, "eval_seeds": [10, 20]}}
MORE_DEMO_SEEDS = list(range(10, 101, 10))


def pair_work(pair: str) -> Path:
    """Where a pair's base run (fine-tuned teacher, student) and its compared runs live."""
    return (ROOT / "bench" / ".cache" / "teacher_signal" / pair).resolve()


# --------------------------------------------------------------------------------------------------------
# 1. The approximation


def scored_logits(model_path: str, rows: list[tuple[str, str]], max_response_tokens: int) -> torch.Tensor:
    """The model's logits at every response position of ``rows``, stacked: [tokens, vocab] fp32."""
    from srd_ray.distill.batches import MicroBatch
    from srd_ray.distill.losses import gather_scored
    from srd_ray.models import encode_example, final_hidden_states, load_model, load_tokenizer, output_head
    from srd_ray.spec import ModelSpec

    spec = ModelSpec(path=model_path)
    tokenizer, model = load_tokenizer(spec), load_model(spec).eval()
    parts = []
    with torch.no_grad():
        for prompt, response in rows:
            batch = MicroBatch.of([encode_example(tokenizer, prompt, response, 256, max_response_tokens)], 0)
            hidden = gather_scored(final_hidden_states(model, batch.input_ids, batch.attention_mask), batch.scored)
            parts.append(output_head(model, len(tokenizer)).logits(hidden))
    return torch.cat(parts)


TAILS = ("stored", "extrapolated", "one_outcome")  # how the teacher's tail bucket is tempered (T != 1)


def stored_topk(teacher_logits: torch.Tensor, k: int, tail: str = "stored"):
    """What the teacher pass stores: top-k ids, float16 log-probs, the exact tail log-mass and the exact
    tempered tail log-masses at T 1.5 and 2 (the transformers engine). ``tail``: "extrapolated" leaves the
    tempered tails out, so the loss extrapolates them from the top k (the vLLM engine, and every topk run
    made before tempered tails were stored); "one_outcome" re-tempers the tail as if it were one token."""
    from srd_ray.distill.losses import SparseTeacher
    from srd_ray.engines import topk_of

    class OneOutcomeTail(SparseTeacher):
        def tempered_tail(self, rows: slice, vocab_size: int, temperature: float) -> torch.Tensor:
            return self.tail[rows] / temperature

    temperatures = (1.5, 2.0) if tail == "stored" else ()
    ids, logprobs, tail_mass, tempered, _ = topk_of(teacher_logits, k, temperatures)
    kind = OneOutcomeTail if tail == "one_outcome" else SparseTeacher
    return kind(ids.long(), logprobs.half().float(), tail_mass, tempered if temperatures else None, temperatures)


def relative_errors(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss, temperature: float,
                    teachers: dict[Any, Any]) -> dict[Any, dict[str, float]]:  # fmt: skip
    """Per sparse teacher: mean |KD_topk - KD_exact| per token, relative error of the summed KD and of the
    gradient with respect to the student's logits (against the exact KD of the full teacher)."""
    from srd_ray.distill.losses import token_kd

    exact_input = student_logits.clone().requires_grad_()
    exact = token_kd(exact_input, teacher_logits, loss, temperature)
    exact.sum().backward()
    errors = {}
    for key, teacher in teachers.items():
        sparse_input = student_logits.clone().requires_grad_()
        sparse = teacher.kd(sparse_input, slice(None), loss, temperature)
        sparse.sum().backward()
        errors[key] = {
            "mean_kd_exact": exact.mean().item(),
            "mean_abs_error": (sparse - exact).abs().mean().item(),
            "kd_relative_error": ((sparse - exact).abs().sum() / exact.sum()).item(),
            "gradient_relative_error": ((sparse_input.grad - exact_input.grad).norm() / exact_input.grad.norm()).item(),
        }
    return errors


def approximation(pair: str, work: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    from srd_ray.distill.losses import KD_LOSS_NAMES, LossSettings

    lines = (work / "base" / "prepare" / "demo_heldout.jsonl").read_text().splitlines()[:APPROXIMATION_ROWS]
    rows = [(json.loads(line)["prompt"], json.loads(line)["output"]) for line in lines]
    student_path = settings["models"]["student"].replace("${run_dir}", str(work / "base"))
    teacher_logits = scored_logits(
        str(work / "base" / "teacher_sft" / "model"), rows, settings["data"]["max_response_tokens"]
    )
    student_logits = scored_logits(student_path, rows, settings["data"]["max_response_tokens"])
    keys = [(k, "stored") for k in KS] + [(K, tail) for tail in TAILS[1:]]
    teachers = {(k, tail): stored_topk(teacher_logits, k, tail) for k, tail in keys}
    results = []
    for name in KD_LOSS_NAMES[:-1]:  # sft has no KD term
        for temperature in (1.0, 2.0):
            errors = relative_errors(student_logits, teacher_logits, LossSettings(name), temperature, teachers)
            cell = {"pair": pair, "loss": name, "temperature": temperature}
            results += [{**cell, "k": k, "tail": tail, **errors[k, tail]} for k, tail in keys]
    print(f"[teacher_signal] approximation on {pair}: {len(teacher_logits)} tokens", flush=True)
    return results


def tail_by_task(heldout: Path, teacher: Path, student: Path) -> dict[str, dict[str, float]]:
    """Part 5: per task of the demo held-out rows (over all their response tokens), the teacher's mean
    tail mass and fkl's relative top-k errors (KD value and gradient), with stored and extrapolated tails."""
    from srd_ray.distill.losses import LossSettings

    by_task: dict[str, list[tuple[str, str]]] = {}
    for line in heldout.read_text().splitlines():
        row = json.loads(line)
        by_task.setdefault(row["task"], []).append((row["prompt"], row["output"]))
    results = {}
    for task, rows in sorted(by_task.items()):
        teacher_logits, student_logits = scored_logits(str(teacher), rows, 32), scored_logits(str(student), rows, 32)
        log_probs = torch.log_softmax(teacher_logits, -1)
        values = {f"tail_mass_k{k}": (1 - log_probs.topk(k, -1).values.exp().sum(-1)).mean().item() for k in (64, 256)}
        teachers = {tail: stored_topk(teacher_logits, K, tail) for tail in TAILS[:2]}
        for temperature in (1.0, 2.0):
            errors = relative_errors(student_logits, teacher_logits, LossSettings("fkl"), temperature, teachers)
            for tail in TAILS[: 1 if temperature == 1.0 else 2]:  # at T 1 the tail is stored either way
                suffix = f"k{K}_T{temperature:g}" + ("" if temperature == 1.0 else f"_{tail}")
                values[f"fkl_{suffix}_relative_error"] = errors[tail]["kd_relative_error"]
                values[f"fkl_{suffix}_gradient_error"] = errors[tail]["gradient_relative_error"]
        results[task] = values
    return results


def write_tail_by_task() -> None:
    """Part 5 on the healed student's base run (``bench/srd_evidence.py --experiment healed``)."""
    cache = ROOT / "bench" / ".cache"
    tails = tail_by_task(
        cache / "srd_evidence" / "healed" / "base" / "prepare" / "demo_heldout.jsonl",
        cache / "teacher_signal" / "smollm2" / "base" / "teacher_sft" / "model",
        cache / "SmolLM2-12-layers-healed",
    )
    (RESULTS / "teacher_signal_tail_by_task.json").write_text(json.dumps(tails, indent=2) + "\n")
    names = list(next(iter(tails.values())))
    lines = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {task} | " + " | ".join(f"{v[n]:.4f}" for n in names) + " |" for task, v in tails.items()]
    (RESULTS / "teacher_signal_tail_by_task.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


ADAPTIVE_SIGNALS = (  # (label, fixed k or max_k, coverage, temperature the coverage is measured at)
    ("k64", 64, None, None),
    ("k256", 256, None, None),
    ("k1024", 1024, None, None),
    *((f"adaptive {c:g} at T 2", 1024, c, 2.0) for c in (0.9, 0.95, 0.99)),
    *((f"adaptive {c:g} at T 1", 1024, c, 1.0) for c in (0.99, 0.999)),
)


def adaptive_signal(teacher_logits: torch.Tensor, max_k: int, coverage: float | None, at: float | None):
    """The teacher pass's signal with a fixed k (``coverage`` None) or adaptive k: float16 log-probs, exact
    tails at T 1.5 and 2, padding as the worker reads it; and the mean ids stored per token."""
    from srd_ray.distill.losses import SparseTeacher
    from srd_ray.engines import topk_of

    ids, logprobs, tail, tempered, counts = topk_of(teacher_logits, max_k, (1.5, 2.0), coverage, at)
    width = int(counts.max())
    signal = SparseTeacher(ids[:, :width].long(), logprobs[:, :width].half().float(), tail, tempered, (1.5, 2.0))
    return signal, counts.float().mean().item()


def write_adaptive() -> None:
    """Part 9: fixed k against adaptive k on the 60 demo held-out rows, the fine-tuned SmolLM2 teacher of
    ``srd_evidence.py``'s healed experiment against the student SRD trained online there (srd-seed0): per
    signal the mean ids and raw bytes per response token, and fkl's KD and gradient relative errors at T 1,
    1.5 and 2 (stored tempered tails)."""
    from srd_ray.distill.losses import LossSettings
    from srd_ray.teacher_signal import bytes_per_token

    cache = ROOT / "bench" / ".cache" / "srd_evidence" / "healed"
    heldout = cache / "base" / "prepare" / "demo_heldout.jsonl"
    rows = [(json.loads(line)["prompt"], json.loads(line)["output"]) for line in heldout.read_text().splitlines()]
    teacher = scored_logits(str(cache / "base" / "teacher_sft" / "model"), rows, 32)
    student = scored_logits(str(cache / "srd-seed0" / "distill" / "model"), rows, 32)
    signals, results = {}, []
    for label, k, coverage, at in ADAPTIVE_SIGNALS:
        signals[label], ids = adaptive_signal(teacher, k, coverage, at)
        raw = bytes_per_token(ids, "float16", 2, adaptive=coverage is not None)
        results.append({"signal": label, "ids_per_token": ids, "raw_bytes_per_token": raw})
    for temperature in (1.0, 1.5, 2.0):
        errors = relative_errors(student, teacher, LossSettings("fkl"), temperature, signals)
        for result in results:
            result[f"kd_error_T{temperature:g}"] = errors[result["signal"]]["kd_relative_error"]
            result[f"gradient_error_T{temperature:g}"] = errors[result["signal"]]["gradient_relative_error"]
    (RESULTS / "teacher_signal_adaptive.json").write_text(json.dumps(results, indent=2) + "\n")
    names = [name for name in results[0] if name != "signal"]
    lines = [f"fkl, teacher vs the SRD-trained healed student, {len(rows)} demo held-out rows, {len(teacher)} "
             "tokens (protocol part 9); raw bytes with float16 log-probs and tails at T 1.5 and 2.", "",
             "| signal | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]  # fmt: skip
    lines += [f"| {r['signal']} | " + " | ".join(f"{r[n]:.4g}" for n in names) + " |" for r in results]
    (RESULTS / "teacher_signal_adaptive.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_tail_after_training() -> None:
    """Part 7: the teacher's tempered mass outside its top k, and fkl's top-k errors (stored tails), against
    the student as SRD trained it online (``srd_evidence.py --experiment healed``, run srd-seed0)."""
    from srd_ray.distill.losses import LossSettings

    cache = ROOT / "bench" / ".cache"
    heldout = cache / "srd_evidence" / "healed" / "base" / "prepare" / "demo_heldout.jsonl"
    rows = [(json.loads(line)["prompt"], json.loads(line)["output"]) for line in heldout.read_text().splitlines()]
    teacher = scored_logits(str(cache / "teacher_signal" / "smollm2" / "base" / "teacher_sft" / "model"), rows, 32)
    student = scored_logits(str(cache / "srd_evidence" / "healed" / "srd-seed0" / "distill" / "model"), rows, 32)
    ks, results = (64, 256, 1024), []
    for temperature in (1.0, 1.5, 2.0):
        tempered = torch.log_softmax(torch.log_softmax(teacher, -1) / temperature, -1)
        errors = relative_errors(student, teacher, LossSettings("fkl"), temperature,
                                 {k: stored_topk(teacher, k) for k in ks})  # fmt: skip
        for k in ks:
            outside = 1 - tempered.topk(k, -1).values.exp().sum(-1).mean().item()
            results.append({"temperature": temperature, "k": k, "tempered_mass_outside_top_k": outside, **errors[k]})
    (RESULTS / "teacher_signal_tail_trained.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"Teacher vs the SRD-trained healed student, {len(rows)} demo held-out rows, {len(teacher)} tokens "
             "(protocol part 7).", "",
             "| T | k | tempered mass outside top k | KD_exact | KD relative error | gradient relative error |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['temperature']:g} | {r['k']} | {r['tempered_mass_outside_top_k']:.3f} | {r['mean_kd_exact']:.3f} "
              f"| {r['kd_relative_error']:.3f} | {r['gradient_relative_error']:.3f} |" for r in results]  # fmt: skip
    (RESULTS / "teacher_signal_tail_trained.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# --------------------------------------------------------------------------------------------------------
# 2. The runs


def run_spec(base: dict, settings: dict, work: Path, name: str, label: str, seed: int) -> dict[str, Any]:
    spec = compared_spec(base, settings, work, "fkl", seed, "srd")
    spec["run"]["name"] = name
    signal, k = SIGNALS[label]
    spec["distill"]["teacher_signal"] = signal
    spec["teacher_signal"] = {"k": k, "concurrency": 2, "batch_size": 16}
    return spec


def run_record(run_dir: Path) -> dict[str, Any]:
    stages = json.loads((run_dir / "run.json").read_text())["stages"]
    distill = stages["distill"]["summary"]
    walls = {
        name: stages[name]["wall_s"] for name in ("reflect", "rank", "teacher_signal", "distill") if name in stages
    }
    metrics = [json.loads(line) for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
    rates = [m["tokens_per_s"] for m in metrics if "event" not in m]
    scores = stages["evaluate"]["summary"]["student_after"]
    return {
        "scores": {name: result["rouge_l"] for name, result in scores.items()},
        "train_wall_s": distill["train_wall_s"],
        "tokens_seen": distill["tokens_seen"],
        "tokens_per_s": distill["tokens_seen"] / distill["train_wall_s"],
        "steady_tokens_per_s": statistics.median(rates),
        "teacher_pass_s": walls.get("teacher_signal", 0.0),
        "end_to_end_s": sum(walls.values()),
        "signal": stages.get("teacher_signal", {}).get("summary"),
        "heldout_kd": distill["heldout_kd"],
    }


def more_demo_seeds(pair: str, seeds: list[int], labels: list[str]) -> dict[str, Any]:
    """Part 4: every trained student on the demo held-out split again, with ``MORE_DEMO_SEEDS`` (an
    evaluation already made is read back)."""
    import yaml

    work = pair_work(pair)
    label = f"demo_heldout_{len(MORE_DEMO_SEEDS)}_seeds"
    runs: dict[str, list[dict[str, Any]]] = {}
    for signal in labels:
        for seed in seeds:
            spec = yaml.safe_load((work / "specs" / f"{signal}-seed{seed}.yaml").read_text())
            spec["data"]["eval_sets"] = {"demo_heldout": spec["data"]["eval_sets"]["demo_heldout"]}
            spec["evaluate"].update(seeds=MORE_DEMO_SEEDS, max_examples=None)
            model = work / f"{signal}-seed{seed}" / "distill" / "model"
            spec["models"]["student"]["path"] = str(model)  # the run's own may point into a removed worktree
            path = work / "specs" / f"{signal}-seed{seed}-{label}.yaml"
            path.write_text(yaml.safe_dump(spec, sort_keys=False))
            summary_path = work / f"{signal}-seed{seed}" / "evaluate" / label / "summary.json"
            if not summary_path.exists():
                srd("evaluate", str(path), "--model", str(model), "--name", label)
            summary = json.loads(summary_path.read_text())
            result = summary["sets"]["demo_heldout"]
            runs.setdefault(signal, []).append(
                {"rouge_l": result["rouge_l"], "eval_seed_std": result["rouge_l_std"], "rows": result["examples"]}
            )
    return {"eval_seeds": MORE_DEMO_SEEDS, "runs": runs}


def more_seeds_lines(more: dict[str, Any]) -> list[str]:
    runs = more["runs"]
    rows = runs["online"][0]["rows"]
    lines = [f"Demo held-out split again, all {rows} rows x {len(more['eval_seeds'])} sampling seeds "
             f"{more['eval_seeds'][0]}..{more['eval_seeds'][-1]} per trained student (protocol part 4):", "",
             "| signal | per training seed | mean ± std | eval-seed std of one student |",
             "|---|---|---|---|"]  # fmt: skip
    for signal in runs:
        scores = [r["rouge_l"] for r in runs[signal]]
        noise = statistics.fmean(r["eval_seed_std"] for r in runs[signal])
        lines.append(f"| {signal} | " + ", ".join(f"{x:.2f}" for x in scores)
                     + " | {:.2f} ± {:.2f} | {:.2f} |".format(*mean_std(scores), noise))  # fmt: skip
    for signal in [label for label in runs if label != "online"]:
        differences = [t["rouge_l"] - o["rouge_l"] for t, o in zip(runs[signal], runs["online"], strict=True)]
        lines.append(f"| {signal} - online (paired) | " + ", ".join(f"{x:+.2f}" for x in differences)
                     + " | {:+.2f} ± {:.2f} | |".format(*mean_std(differences)))  # fmt: skip
    return [*lines, ""]


# --------------------------------------------------------------------------------------------------------
# 3. FLOPs


def matmul_parameters(model_path: str) -> int:
    """Decoder-layer parameters plus the output head's (the embedding lookup costs no matmul)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = sum(p.numel() for name, p in model.named_parameters() if ".layers." in name or ".h." in name)
    head = model.get_output_embeddings().weight
    return layers + head.numel()


def gpt2_projection(tokens_per_row: float) -> dict[str, Any]:
    """The paper's GPT-2 XL -> GPT-2 setting: training FLOPs online vs with the top-k pass."""
    n_teacher, n_student = 1.48e9 + 50257 * 1600, 85.0e6 + 50257 * 768  # GPT-2 XL / GPT-2: layers + head
    rows, kept = 11_400, 0.75
    row_passes = rows * 8 * (0.25 + 0.5 + 0.75)  # 24 stage-epochs over 1/4, 1/2, 3/4 of the rows
    tokens = row_passes * tokens_per_row
    student = 6 * n_student * tokens
    teacher_online = 2 * n_teacher * tokens
    teacher_topk = 2 * n_teacher * rows * kept * tokens_per_row  # one forward over each kept row
    return {
        "rows": rows, "row_passes": row_passes, "tokens_per_row": tokens_per_row,
        "teacher_flops_online": teacher_online, "teacher_flops_topk": teacher_topk,
        "total_flops_online": student + teacher_online, "total_flops_topk": student + teacher_topk,
        "teacher_share_online": teacher_online / (student + teacher_online),
        "total_ratio": (student + teacher_online) / (student + teacher_topk),
    }  # fmt: skip


def dolly_tokens_per_row(tokenizer_path: str) -> float:
    """Mean prompt + response tokens (256 + 256 at most) of the real Dolly rows, with the pair's tokenizer."""
    from srd_ray.models import encode_example, load_tokenizer
    from srd_ray.spec import ModelSpec

    tokenizer = load_tokenizer(ModelSpec(path=tokenizer_path))
    rows = [json.loads(line) for line in (SHARED_EVAL / "dolly.jsonl").read_text().splitlines()]
    lengths = [len(encode_example(tokenizer, r["prompt"], r["output"], 256, 256).input_ids) for r in rows]
    return statistics.fmean(lengths)


# --------------------------------------------------------------------------------------------------------


def trained_runs(pair: str, seeds: list[int], labels: list[str], prefix: str = "") -> dict[str, Any]:
    """Train (or reuse) run ``{prefix}{label}-seed{seed}`` for every seed and label, seed by seed so that
    the labels' timings interleave; the records of every label whose runs all finished."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = pair_work(pair)
    settings = {**pair_settings(pair, ROOT / "bench" / ".cache"), **EVAL[pair]}
    base = prepare_base(settings, work)
    for seed in seeds:
        for label in labels:
            name = f"{prefix}{label}-seed{seed}"
            if not evaluated(work / name):
                srd("run", str(write_spec(run_spec(base, settings, work, name, label, seed), work)))
    teacher = str(work / "base" / "teacher_sft" / "model")
    student = settings["models"]["student"].replace("${run_dir}", str(work / "base"))
    n_teacher, n_student = matmul_parameters(teacher), matmul_parameters(student)
    return {
        "pair": pair,
        "machine": MACHINE,
        "settings": {"k": K, "seeds": seeds, "srd_epochs": settings["srd_epochs"], **EVAL[pair]},
        "reference": base_scores(work),
        "runs": {
            label: [run_record(work / f"{prefix}{label}-seed{seed}") for seed in seeds]
            for label in SIGNALS
            if all(evaluated(work / f"{prefix}{label}-seed{seed}") for seed in seeds)
        },
        "flops_per_token": {
            "student_only": 6 * n_student,
            "student_and_teacher": 6 * n_student + 2 * n_teacher,
            "bound": (6 * n_student + 2 * n_teacher) / (6 * n_student),
        },
    }


def run_pair(pair: str, seeds: list[int], labels: list[str]) -> dict[str, Any]:
    result = trained_runs(pair, seeds, labels)
    work = pair_work(pair)
    settings = pair_settings(pair, ROOT / "bench" / ".cache")
    return {
        **result,
        "approximation": approximation(pair, work, settings),
        "gpt2_projection": gpt2_projection(dolly_tokens_per_row(str(work / "base" / "teacher_sft" / "model"))),
    }


def markdown(results: dict[str, dict[str, Any]]) -> str:
    lines = ["# Teacher signal: computed once (top-k) vs the online teacher", "",
             f"Machine: {next(iter(results.values()))['machine']}. Protocol: `bench/teacher_signal.py` docstring. "
             "SRD fkl, float16 log-probs; training seeds per pair below. Signals: topk is k 64, made before the "
             "teacher pass stored tempered tails (at T 1.5 and 2 it trained with the tail extrapolated from the "
             "top k: the approximation tables' extrapolated column; protocol part 6); topk_tail is k 64 and "
             "topk1024 k 1024, both with the stored tempered tails.",
             ""]  # fmt: skip
    for pair, result in results.items():
        lines += run_table(f"## {pair} pair", result) + approximation_table(pair, result["approximation"]) + [""]
        if "side_by_side" in result:
            lines += side_by_side_lines(pair, result)
    # SmolLM2's 49k-token BPE counts Dolly's rows close to GPT-2's 50k one; the tiny 800-token BPE does not.
    tokenizer_pair = "smollm2" if "smollm2" in results else next(iter(results))
    projection = results[tokenizer_pair]["gpt2_projection"]
    lines += [
        "## Projection to the paper's GPT-2 setting (GPT-2 XL 1.5B -> GPT-2 124M)", "",
        f"{projection['rows']:,} rows, {projection['row_passes']:,.0f} row passes (24 stage-epochs over 1/4, 1/2, "
        f"3/4), {projection['tokens_per_row']:.0f} tokens a row (../shared/data/eval/dolly.jsonl with the "
        f"{tokenizer_pair} pair's tokenizer, 256 + 256 at most).", "",
        "| | teacher FLOPs | total FLOPs |", "|---|---|---|",
        f"| online | {projection['teacher_flops_online']:.2e} | {projection['total_flops_online']:.2e} |",
        f"| topk (one pass over the kept 3/4) | {projection['teacher_flops_topk']:.2e} | "
        f"{projection['total_flops_topk']:.2e} |",
        "", f"Online, the teacher is {100 * projection['teacher_share_online']:.0f}% of the training FLOPs; the top-k "
        f"pass cuts total FLOPs {projection['total_ratio']:.1f}x.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def run_table(title: str, result: dict[str, Any]) -> list[str]:
    runs = result["runs"]
    sets = sorted(result["reference"]["teacher"])
    flops = result["flops_per_token"]
    lines = [title, "",
             f"FLOPs per training token: student only {flops['student_only']:.3g}, student + teacher "
             f"{flops['student_and_teacher']:.3g}: topk can be at most {flops['bound']:.2f}x faster. Training seeds "
             f"{result['settings']['seeds']}.", "",
             "| signal | " + " | ".join(sets) + " | distill wall s | tokens/s | steady tokens/s | teacher pass s "
             "| end-to-end s |", "|---|" + "---|" * (len(sets) + 5)]  # fmt: skip
    for label, scores in result["reference"].items():
        lines.append(f"| {label} | " + " | ".join(f"{scores[s]:.2f}" for s in sets) + " | | | | | |")
    for signal in runs:
        cells = ["{:.2f} ± {:.2f}".format(*mean_std([r["scores"][s] for r in runs[signal]])) for s in sets]
        keys = ("train_wall_s", "tokens_per_s", "steady_tokens_per_s", "teacher_pass_s", "end_to_end_s")
        timing = [statistics.fmean(r[key] for r in runs[signal]) for key in keys]
        lines.append(
            f"| {signal} | " + " | ".join(cells) + " | {:.1f} | {:.0f} | {:.0f} | {:.1f} | {:.1f} |".format(*timing)
        )
    for signal in [label for label in runs if label != "online"]:
        pairs = list(zip(runs[signal], runs["online"], strict=True))
        differences = [
            "{:+.2f} ± {:.2f}".format(*mean_std([t["scores"][s] - o["scores"][s] for t, o in pairs])) for s in sets
        ]
        ratio = [statistics.fmean(t[key] for t, _ in pairs) / statistics.fmean(o[key] for _, o in pairs)
                 for key in ("train_wall_s", "tokens_per_s", "steady_tokens_per_s")]  # fmt: skip
        lines.append(f"| {signal} - online (paired) | " + " | ".join(differences) +
                     " | {:.2f}x | {:.2f}x | {:.2f}x | | |".format(*ratio))  # fmt: skip
    if "more_demo_seeds" in result:
        lines += ["", *more_seeds_lines(result["more_demo_seeds"])]
    lines.append("")
    for label in [label for label in runs if label != "online"]:
        signal = runs[label][0]["signal"]
        lines.append(f"Teacher pass ({label}, k {signal.get('k', K)}): {signal['rows']} rows, "
                     f"{signal['response_tokens']} response tokens, {signal['stored_bytes'] / 2**20:.1f} MB stored "
                     f"({signal['stored_bytes_per_token']} bytes per token; {signal['raw_bytes_per_token']} "
                     f"uncompressed), engine {signal['engine']}.")  # fmt: skip
    return [*lines, ""]


def side_by_side_lines(pair: str, result: dict[str, Any]) -> list[str]:
    """Part 8's table, and whether its reruns reproduced the scores of the same seeds in the main table."""
    side = result["side_by_side"]
    first = {(label, seed): run for label, runs in result["runs"].items()
             for seed, run in zip(result["settings"]["seeds"], runs, strict=True)}  # fmt: skip
    reproduced = all(
        run["scores"] == first[label, seed]["scores"]
        for label, runs in side["runs"].items()
        for seed, run in zip(side["settings"]["seeds"], runs, strict=True)
        if (label, seed) in first
    )
    return [
        f"### {pair}: the signals timed side by side (protocol part 8)", "",
        "The main table's runs were trained in different sessions, under different load, so its speed ratios "
        "mix conditions; these runs were trained in one invocation, seed by seed. Their scores "
        + ("equal" if reproduced else "differ from")
        + " the main table's runs of the same label and seed: training and evaluation are deterministic.", "",
        *run_table("", side)[2:],
    ]  # fmt: skip


def approximation_table(pair: str, rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"Top-k approximation on {pair} (held-out rows): mean |KD_exact - KD_topk| per token (mean KD_exact) / "
             "relative gradient error, with the tempered tail mass stored by the teacher pass (transformers "
             f"engine). Last two columns, k {K}: the tail mass extrapolated from the top k (vLLM engine), and "
             "re-tempered as one outcome (not used).", "",
             "| loss | T | " + " | ".join(f"k {k}" for k in KS) + f" | k {K}, extrapolated tail | k {K}, tail as one "
             "outcome |", "|---|---|" + "---|" * (len(KS) + 2)]  # fmt: skip
    for loss in dict.fromkeys(r["loss"] for r in rows):
        for temperature in (1.0, 2.0):
            keys = [(k, "stored") for k in KS] + [(K, tail) for tail in TAILS[1:]]
            cells = [next(r for r in rows if (r["loss"], r["temperature"], r["k"], r["tail"])
                          == (loss, temperature, *key)) for key in keys]  # fmt: skip
            lines.append(f"| {loss} | {temperature:g} | " + " | ".join(
                f"{c['mean_abs_error']:.4f} ({c['mean_kd_exact']:.3f}) / {c['gradient_relative_error']:.3f}"
                for c in cells) + " |")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=["tiny", "smollm2"])
    parser.add_argument("--summarize", action="store_true", help="only rewrite the markdown from the JSON files")
    parser.add_argument("--more-demo-seeds", action="store_true", help="part 4 only, on --pair's trained students")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="training seeds (finished runs are reused)")
    parser.add_argument("--tail-by-task", action="store_true", help="part 5 only")
    parser.add_argument("--tail-after-training", action="store_true", help="part 7 only")
    parser.add_argument("--adaptive", action="store_true", help="part 9 only")
    parser.add_argument("--approximation", action="store_true", help="part 1 only, on --pair's base run")
    parser.add_argument("--side-by-side", action="store_true", help="part 8: --signals retrained as timed- runs")
    parser.add_argument("--signals", default="online,topk", help=f"run labels to run, of {', '.join(SIGNALS)}")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.tail_by_task:
        write_tail_by_task()
        return
    if args.tail_after_training:
        write_tail_after_training()
        return
    if args.adaptive:
        write_adaptive()
        return
    if args.pair and args.approximation:
        path = RESULTS / f"teacher_signal_{args.pair}.json"
        result = json.loads(path.read_text())
        work = pair_work(args.pair)
        result["approximation"] = approximation(args.pair, work, pair_settings(args.pair, ROOT / "bench" / ".cache"))
        path.write_text(json.dumps(result, indent=2) + "\n")
    elif args.pair and args.more_demo_seeds:
        path = RESULTS / f"teacher_signal_{args.pair}.json"
        result = json.loads(path.read_text())
        result["more_demo_seeds"] = more_demo_seeds(args.pair, result["settings"]["seeds"], list(result["runs"]))
        path.write_text(json.dumps(result, indent=2) + "\n")
    elif args.pair and args.side_by_side:
        path = RESULTS / f"teacher_signal_{args.pair}.json"
        result = json.loads(path.read_text())
        seeds = [int(seed) for seed in args.seeds.split(",")]
        result["side_by_side"] = trained_runs(args.pair, seeds, args.signals.split(","), prefix="timed-")
        path.write_text(json.dumps(result, indent=2) + "\n")
    elif args.pair:
        path = RESULTS / f"teacher_signal_{args.pair}.json"
        result = run_pair(args.pair, [int(seed) for seed in args.seeds.split(",")], args.signals.split(","))
        previous = json.loads(path.read_text()) if path.exists() else {}
        if "side_by_side" in previous:  # part 8 is its own set of runs; part 4 is rerun with --more-demo-seeds
            result["side_by_side"] = previous["side_by_side"]
        path.write_text(json.dumps(result, indent=2) + "\n")
    results = {pair: json.loads(path.read_text()) for pair in ("tiny", "smollm2")
               if (path := RESULTS / f"teacher_signal_{pair}.json").exists()}  # fmt: skip
    save_results("teacher_signal", results, markdown(results))


if __name__ == "__main__":
    main()
