"""Evaluate: the MiniLLM / DistiLLM / SRD protocol.

For each held-out set and each seed, sample one answer per prompt (temperature 1, top-k off, top-p 1,
no-repeat-ngram 6 by default), score ROUGE-L F x100 (stemmed, best over references) and exact match, and
report per set the mean and standard deviation over seeds of the per-seed mean.

Core: :func:`score_predictions` and :func:`summarize` (pure, on Arrow). Driver: :func:`run_evaluate`
generates on a Ray Data actor pool with the same engines as reflect.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from srd_ray import storage
from srd_ray.engines import build_engine, row_seed
from srd_ray.ray_errors import reraise_srd_error
from srd_ray.scoring import exact_match, rouge_l
from srd_ray.spec import DataSpec, EvaluateSpec, ModelSpec, VllmSpec
from srd_ray.storage import Location, Place

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


def expand_seeds(eval_sets: dict[str, pa.Table], seeds: list[int], max_examples: int | None) -> pa.Table:
    """One row per (eval set, seed, example): the work list for generation."""
    parts = []
    for name, table in eval_sets.items():
        table = table.sort_by("input_position").select(["example_id", "prompt", "references"])
        if max_examples is not None:
            table = table.slice(0, max_examples)
        for seed in seeds:
            parts.append(
                table.append_column("eval_set", pa.array([name] * table.num_rows, pa.string()))
                .append_column("seed", pa.array([seed] * table.num_rows, pa.int64()))
                .select(PREDICTION_COLUMNS)
            )
    return pa.concat_tables(parts)


class EvalActor:
    def __init__(self, model: ModelSpec, data: DataSpec, evaluate: EvaluateSpec, engine: str, vllm: VllmSpec) -> None:
        self.evaluate = evaluate
        self.engine = build_engine(
            engine,
            model,
            data,
            max_new_tokens=evaluate.generation.max_new_tokens,
            batch_size=evaluate.batch_size,
            num_gpus=evaluate.num_gpus_per_actor,
            vllm=vllm,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        # A sample's seed comes from (run seed, example): the same example gets the same sample wherever
        # and with whatever neighbours it runs.
        seeds = [
            row_seed(s, e) for s, e in zip(batch["seed"].to_pylist(), batch["example_id"].to_pylist(), strict=True)
        ]
        answers = self.engine.generate(batch["prompt"].to_pylist(), self.evaluate.generation, seeds)
        return score_predictions(batch.append_column("prediction", pa.array(answers.texts, pa.string())))


def run_evaluate(
    spec_evaluate: EvaluateSpec,
    data: DataSpec,
    engine: str,
    vllm: VllmSpec,
    model: ModelSpec,
    eval_sets: dict[str, pa.Table],
    out_dir: Place,
) -> dict[str, Any]:
    """Evaluate one model on every eval set; writes ``predictions.parquet`` and returns the summary."""
    import ray

    work = expand_seeds(eval_sets, spec_evaluate.seeds, spec_evaluate.max_examples)
    dataset = ray.data.from_arrow(work).map_batches(
        EvalActor,
        # Settings travel as pydantic objects (they pickle), never as dicts to re-validate.
        fn_constructor_kwargs={"model": model, "data": data, "evaluate": spec_evaluate, "engine": engine, "vllm": vllm},
        batch_size=spec_evaluate.batch_size * 4,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=spec_evaluate.concurrency),
        num_cpus=spec_evaluate.num_cpus_per_actor,
        num_gpus=spec_evaluate.num_gpus_per_actor,
    )
    with reraise_srd_error():
        predictions = pa.concat_tables(ray.get(dataset.to_arrow_refs()))
    _check_complete(work, predictions)
    predictions = predictions.sort_by([("eval_set", "ascending"), ("seed", "ascending"), ("example_id", "ascending")])
    out_dir = Location.of(out_dir)
    storage.write_parquet(out_dir / "predictions.parquet", predictions)
    summary = summarize(predictions)
    storage.write_json(out_dir / "summary.json", {"model": model.path, "sets": summary})
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
