"""The front door under fuzzing: mutated specs and data files never show a Python traceback.

Property (hypothesis): ``srd validate`` and ``srd run --stages reflect`` on a mutated input either succeed
or exit 2 with one ``error:`` line naming the field, row or file, and a refused run leaves no output.
Generation is derandomized (the same cases every CI run) and sized for CI: 1,000 spec cases through
``validate``, 150 damaged YAML files through ``validate`` and ``run``, and 16 damaged data files through
``run --stages reflect`` (bad ones stop before Ray; the rest run reflection on 12 rows in the test
session's Ray, ~3.5 s each on 2 cores, which is what bounds the count).
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from srd_ray.cli import main

pytestmark = pytest.mark.slow

FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))

# Keys of the spec a mutation may touch: every section and some leaves deep inside.
KEY_PATHS = [
    "run", "run.name", "run.output_dir", "run.seed", "ray", "ray.num_cpus", "ray.object_store_memory_mb",
    "models", "models.teacher", "models.teacher.path", "models.student.path", "models.student.dtype",
    "models.student.lora", "models.student.lora.r", "models.teacher.adapter", "data", "data.train",
    "data.train.path", "data.train.max_rows", "data.train.fields", "data.eval_sets", "data.max_prompt_tokens",
    "data.max_response_tokens", "data.on_bad_row", "engine", "engine.name", "engine.vllm.tensor_parallel_size",
    "reflect", "reflect.shard_rows", "reflect.concurrency", "reflect.generation", "reflect.generation.temperature",
    "reflect.generation.max_new_tokens", "rank", "rank.num_buckets", "rank.keep_buckets", "rank.signals",
    "teacher_signal.k", "distill", "distill.loss", "distill.stages", "distill.stages.0.temperature",
    "distill.batch_size", "distill.precision", "distill.loss_chunk_tokens", "distill.metrics.mlflow",
    "evaluate.seeds", "teacher_sft.enabled", "prepare.demo_data",
]  # fmt: skip

VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.lists(st.one_of(st.integers(), st.text(max_size=8)), max_size=4),
    st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=8)), max_size=3),
)  # fmt: skip


@pytest.fixture(scope="module")
def base(tiny_models, demo_data, tmp_path_factory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("fuzz")
    rows = [json.loads(line) for line in Path(demo_data["train"]).read_text().splitlines()[:12]]
    return {
        "folder": folder,
        "rows": rows,
        "spec": {
            "run": {"name": "fuzz", "output_dir": str(folder / "runs")},
            "ray": {"num_cpus": 2},
            "models": {"teacher": {"path": tiny_models["teacher"]}, "student": {"path": tiny_models["student"]}},
            "data": {"train": {"path": str(folder / "train.jsonl")}, "max_response_tokens": 16},
            "engine": {"name": "transformers"},
            "reflect": {"shard_rows": 6, "generation": {"max_new_tokens": 4}},
        },
    }


def mutate(spec: dict, path: str, value: Any, action: str) -> dict:
    spec = copy.deepcopy(spec)
    *parents, leaf = path.split(".")
    target: Any = spec
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target.setdefault(part, {})
        if not isinstance(target, dict | list):
            return spec
    if isinstance(target, list):
        return spec
    if action == "delete":
        target.pop(leaf, None)
    elif action == "unknown key":
        target[leaf + "_x"] = value
    else:
        target[leaf] = value
    return spec


def check(status: int, err: str, run_dir: Path | None = None) -> None:
    """Success, or exit 2 with one error line and (for a run) nothing written."""
    assert "Traceback" not in err, err
    assert status in (0, 2), f"exit {status}: {err}"
    if status == 2:
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, err
        if run_dir is not None:
            assert not (run_dir / "reflect").exists(), "a refused run leaves no output"


@settings(FUZZ, max_examples=1000)
@given(st.sampled_from(KEY_PATHS), VALUES, st.sampled_from(["set", "delete", "unknown key"]))
def test_mutated_specs_validate_or_name_the_field(base, capsys, path, value, action):
    with tempfile.TemporaryDirectory() as scratch:
        spec_path = Path(scratch) / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(mutate(base["spec"], path, value, action), allow_unicode=True))
        status = main(["validate", str(spec_path)])
        check(status, capsys.readouterr().err)


def yaml_damage(text: str, position: int, junk: str, kind: str) -> bytes:
    position %= max(len(text), 1)
    if kind == "truncate":
        return text[:position].encode()
    if kind == "insert":
        return (text[:position] + junk + text[position:]).encode()
    if kind == "dedent":
        return re.sub(r"\n  ", "\n", text, count=1 + position % 3).encode()
    return text.encode("utf-16") if kind == "utf-16" else b"\xff\xfe" + text[:position].encode()


@settings(FUZZ, max_examples=150)
@given(st.integers(min_value=0, max_value=5000), st.text(max_size=6),
       st.sampled_from(["truncate", "insert", "dedent", "utf-16", "garbage"]))  # fmt: skip
def test_damaged_yaml_is_refused_by_name(base, capsys, position, junk, kind):
    with tempfile.TemporaryDirectory() as scratch:
        spec_path = Path(scratch) / "spec.yaml"
        spec_path.write_bytes(yaml_damage(yaml.safe_dump(base["spec"]), position, junk, kind))
        for command in (["validate", str(spec_path)], ["run", str(spec_path), "--stages", "reflect"]):
            status = main(command)
            check(status, capsys.readouterr().err, Path(base["spec"]["run"]["output_dir"]) / "fuzz")


ROW_DAMAGE = ["drop column", "extra column", "null", "number", "huge", "empty line", "not json", "list"]


def damaged_rows(rows: list[dict], index: int, kind: str, column: str) -> list[str]:
    lines = [json.dumps(row) for row in rows]
    row = dict(rows[index % len(rows)])
    if kind == "drop column":
        row.pop(column, None)
    elif kind == "extra column":
        row[column + "_extra"] = [1, 2]
    elif kind in ("null", "number", "huge"):
        row[column] = {"null": None, "number": 12345, "huge": "word " * 20000}[kind]
    lines[index % len(rows)] = json.dumps(row)
    if kind == "empty line":
        lines.insert(index % len(rows), "")
    elif kind == "not json":
        lines[index % len(rows)] = lines[index % len(rows)][: len(lines[index % len(rows)]) // 2]
    elif kind == "list":
        lines[index % len(rows)] = json.dumps(list(row.values()))
    return lines


@pytest.mark.parametrize("kind", ROW_DAMAGE)  # every kind of damage, each in 2 generated cases
@settings(FUZZ, max_examples=2)
@given(st.integers(min_value=0, max_value=11), st.sampled_from(["prompt", "output", "instruction", "input"]),
       st.sampled_from(["utf-8", "latin-1", "utf-16", "truncated"]))  # fmt: skip
def test_damaged_data_runs_or_names_the_row(base, capsys, ray_session, kind, index, column, encoding):
    with tempfile.TemporaryDirectory() as scratch:
        spec = copy.deepcopy(base["spec"])
        spec["run"]["output_dir"] = str(Path(scratch) / "runs")
        data = Path(scratch) / "train.jsonl"
        spec["data"]["train"]["path"] = str(data)
        text = "\n".join(damaged_rows(base["rows"], index, kind, column)) + "\n"
        raw = text.encode(encoding) if encoding != "truncated" else text.encode()[: len(text) // 3]
        data.write_bytes(raw)
        spec_path = Path(scratch) / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(spec))
        status = main(["run", str(spec_path), "--stages", "reflect"])
        check(status, capsys.readouterr().err, Path(scratch) / "runs" / "fuzz")
