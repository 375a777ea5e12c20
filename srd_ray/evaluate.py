"""Evaluate: the MiniLLM / DistiLLM / SRD protocol.

For each held-out set and each seed, sample one answer per prompt (temperature 1, top-k off, top-p 1,
no-repeat-ngram 6 by default), score ROUGE-L F x100 (stemmed, best over references) and exact match, and
report per set the mean and standard deviation over seeds of the per-seed mean.

Core: :func:`score_predictions` and :func:`summarize` (pure, on Arrow). Driver: :func:`run_evaluate`
generates on a Ray Data actor pool with the same engines as reflect.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from srd_ray import storage
from srd_ray.encoding import CHAT_COLUMN, prompts_of
from srd_ray.engines import build_engine, row_seed
from srd_ray.failures import reraise_srd_error
from srd_ray.pools import map_with_engine_actors
from srd_ray.progress import Progress
from srd_ray.scoring import exact_match, rouge_l
from srd_ray.spec import DataSpec, EvaluateSpec, JobSpec, ModelSpec, VllmSpec
from srd_ray.storage import Location, Place, is_uri

log = logging.getLogger(__name__)

PREDICTION_COLUMNS = ["eval_set", "seed", "example_id", "prompt", "references"]


def score_predictions(predictions: pa.Table) -> pa.Table:
    """Add ``rouge_l`` (x100) and ``exact_match`` (0/1) to a table with ``prediction`` and ``references``."""
    pairs = zip(predictions["prediction"].to_pylist(), predictions["references"].to_pylist(), strict=True)
    scored = [(100.0 * rouge_l(p, refs), exact_match(p, refs)) for p, refs in pairs]
    predictions = predictions.append_column("rouge_l", pa.array([s[0] for s in scored], pa.float64()))
    return predictions.append_column("exact_match", pa.array([s[1] for s in scored], pa.float64()))


def summarize(predictions: pa.Table) -> dict[str, dict[str, Any]]:
    """Per eval set: mean and (population) standard deviation over seeds of the per-seed means."""
    summary: dict[str, dict[str, Any]] = {}
    grouped = predictions.group_by(["eval_set", "seed"]).aggregate(
        [("rouge_l", "mean"), ("exact_match", "mean"), ("example_id", "count")]
    )
    for name in sorted(set(grouped["eval_set"].to_pylist())):
        rows = grouped.filter(pc.equal(grouped["eval_set"], name)).sort_by("seed")
        rouge = rows["rouge_l_mean"].to_pylist()
        exact = rows["exact_match_mean"].to_pylist()
        summary[name] = {
            "rouge_l": statistics.fmean(rouge),
            "rouge_l_std": statistics.pstdev(rouge),
            "exact_match": 100.0 * statistics.fmean(exact),
            "seeds": rows["seed"].to_pylist(),
            "examples": rows["example_id_count"][0].as_py(),
        }
    return summary


def chat_column(table: pa.Table) -> list[str]:
    """The messages column, for chat rows (the models render them with their chat templates)."""
    return [CHAT_COLUMN] if CHAT_COLUMN in table.column_names else []


def expand_seeds(eval_sets: dict[str, pa.Table], seeds: list[int], max_examples: int | None) -> pa.Table:
    """One row per (eval set, seed, example): the work list for generation."""
    parts = []
    for name, table in eval_sets.items():
        table = table.sort_by("input_position").select(["example_id", "prompt", "references", *chat_column(table)])
        if max_examples is not None:
            table = table.slice(0, max_examples)
        for seed in seeds:
            parts.append(
                table.append_column("eval_set", pa.array([name] * table.num_rows, pa.string()))
                .append_column("seed", pa.array([seed] * table.num_rows, pa.int64()))
                .select([*PREDICTION_COLUMNS, *chat_column(table)])
            )
    return pa.concat_tables(parts)


class EvalActor:
    def __init__(self, model: ModelSpec, data: DataSpec, evaluate: EvaluateSpec, engine: str, vllm: VllmSpec) -> None:
        self.evaluate = evaluate
        self.engine = build_engine(
            engine, model, data, evaluate, max_new_tokens=evaluate.generation.max_new_tokens, vllm=vllm
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        # A sample's seed comes from (run seed, example): the same example gets the same sample wherever
        # and with whatever neighbours it runs.
        seeds = [
            row_seed(s, e) for s, e in zip(batch["seed"].to_pylist(), batch["example_id"].to_pylist(), strict=True)
        ]
        answers = self.engine.generate(prompts_of(batch), self.evaluate.generation, seeds)
        return score_predictions(batch.append_column("prediction", pa.array(answers.texts, pa.string())))


def evaluation_identity(spec: JobSpec, engine: str, model: ModelSpec, eval_sets: dict[str, pa.Table]) -> dict:
    """What makes an evaluation: the model (its path and files), engine, settings and rows."""
    location = Location.of(model.path) if is_uri(model.path) or Path(model.path).exists() else None
    files = [f"{info.path}:{info.size}:{info.mtime_ns}" for info in location.files()] if location else []
    rows = {name: table["example_id"].to_pylist() for name, table in sorted(eval_sets.items())}
    settings = {"evaluate": spec.evaluate.model_dump(mode="json", exclude={"lm_eval"}), "engine": engine,
                "vllm": spec.engine.vllm.model_dump(mode="json"), "max_prompt_tokens": spec.data.max_prompt_tokens,
                "files": files, "rows": rows}  # fmt: skip
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return {"model": model.path, "fingerprint": digest}


def evaluate_once(
    spec: JobSpec, engine: str, model: ModelSpec, eval_sets: dict[str, pa.Table], out_dir: Place
) -> dict[str, Any]:
    """Evaluate ``model`` into ``out_dir``, or reuse the summary already there if it was made for this same
    model, engine, settings and rows (a run interrupted after it); never one made for another model."""
    out_dir = Location.of(out_dir)
    identity = evaluation_identity(spec, engine, model, eval_sets)
    if (out_dir / "summary.json").exists():
        existing = json.loads((out_dir / "summary.json").read_text())
        if existing.get("identity") == identity:
            log.info("evaluate: %s already evaluated with these settings (%s)", model.path, out_dir)
            return existing["sets"]
        log.info("evaluate: %s holds another model's or settings' results; evaluating %s again", out_dir, model.path)
    log.info("evaluate: %s", model.path)
    return run_evaluate(spec.evaluate, spec.data, engine, spec.engine.vllm, model, eval_sets, out_dir, identity)


def run_evaluate(
    spec_evaluate: EvaluateSpec,
    data: DataSpec,
    engine: str,
    vllm: VllmSpec,
    model: ModelSpec,
    eval_sets: dict[str, pa.Table],
    out_dir: Place,
    identity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate one model on every eval set; writes ``predictions.parquet`` and returns the summary."""

    work = expand_seeds(eval_sets, spec_evaluate.seeds, spec_evaluate.max_examples)
    actor_kwargs = {"model": model, "data": data, "evaluate": spec_evaluate, "engine": engine, "vllm": vllm}
    dataset = map_with_engine_actors(
        work, EvalActor, actor_kwargs, spec_evaluate, engine=engine, batch_size=spec_evaluate.batch_size * 4
    )
    parts = []
    with reraise_srd_error(), Progress(f"evaluate {Path(model.path).name}", work.num_rows, "answers") as progress:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            parts.append(batch)
            progress.update(progress.done + batch.num_rows)
    predictions = pa.concat_tables(parts)
    _check_complete(work, predictions)
    predictions = predictions.sort_by([("eval_set", "ascending"), ("seed", "ascending"), ("example_id", "ascending")])
    out_dir = Location.of(out_dir)
    storage.write_parquet(out_dir / "predictions.parquet", predictions)
    summary = summarize(predictions)
    storage.write_json(out_dir / "summary.json", {"model": model.path, "identity": identity, "sets": summary})
    return summary


def _check_complete(work: pa.Table, predictions: pa.Table) -> None:
    """Every (set, seed, example) must come back exactly once: never silently score a subset."""

    def keys(table: pa.Table) -> list[tuple]:
        return list(zip(*(table[c].to_pylist() for c in ("eval_set", "seed", "example_id")), strict=True))

    expected, got = keys(work), keys(predictions)
    if len(got) != len(expected) or set(got) != set(expected):
        missing = set(expected) - set(got)
        raise RuntimeError(
            f"evaluate: {len(got)} predictions for {len(expected)} prompts "
            f"({len(missing)} missing, e.g. {sorted(missing)[:3]})"
        )
