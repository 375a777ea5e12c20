"""The bad-input catalogue: specs, data and models a user can get wrong. Each case runs `srd run` and must
exit 2 with a message naming the field, row or file, before anything is written (no run directory)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from srd_ray.cli import main


@dataclass
class Inputs:
    """A valid job (tiny models, 12 demo rows) that each case then breaks in one way."""

    tmp: Path
    spec: dict[str, Any]
    rows: list[dict[str, Any]]
    teacher: Path
    student: Path
    overrides: list[str] = field(default_factory=list)

    def write_train(self, rows: list[Any], suffix: str = ".jsonl") -> Path:
        path = self.tmp / f"bad_train{suffix}"
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        self.spec["data"]["train"]["path"] = str(path)
        return path

    def model_copy(self, role: str) -> Path:
        copy = self.tmp / f"{role}_copy"
        shutil.copytree(getattr(self, role), copy)
        self.spec["models"][role]["path"] = str(copy)
        return copy


def _set(spec: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        spec = spec.setdefault(part, {})
    spec[last] = value


def spec_case(dotted: str, value: Any) -> Callable[[Inputs], None]:
    return lambda inputs: _set(inputs.spec, dotted, value)


def drop(dotted: str) -> Callable[[Inputs], None]:
    def apply(inputs: Inputs) -> None:
        *parents, last = dotted.split(".")
        target = inputs.spec
        for part in parents:
            target = target[part]
        del target[last]

    return apply


def raw_spec(text: str | bytes) -> Callable[[Inputs], None]:
    def apply(inputs: Inputs) -> None:
        inputs.spec = {"__raw__": text}

    return apply


def rows_with(index: int, **changes: Any) -> Callable[[Inputs], None]:
    def apply(inputs: Inputs) -> None:
        rows = [dict(row) for row in inputs.rows]
        for key, value in changes.items():
            if value is _DELETE:
                del rows[index][key]
            else:
                rows[index][key] = value
        inputs.write_train(rows)

    return apply


_DELETE = object()


def train_lines(make: Callable[[list[str]], list[str]]) -> Callable[[Inputs], None]:
    def apply(inputs: Inputs) -> None:
        inputs.write_train(make([json.dumps(row) for row in inputs.rows]))

    return apply


def non_utf8_row(inputs: Inputs) -> None:
    path = inputs.write_train(inputs.rows)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = lines[3].replace(b'"output": "', b'"output": "\xff\xfe')
    path.write_bytes(b"".join(lines))


def duplicate_ids(inputs: Inputs) -> None:
    inputs.write_train([{**row, "uid": "same" if n < 2 else f"row-{n}"} for n, row in enumerate(inputs.rows)])
    inputs.spec["data"]["train"]["fields"] = {"id": "uid"}


def truncated_parquet(inputs: Inputs) -> None:
    path = inputs.tmp / "train.parquet"
    pq.write_table(pa.Table.from_pylist(inputs.rows), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    inputs.spec["data"]["train"]["path"] = str(path)


def parquet_without_response(inputs: Inputs) -> None:
    path = inputs.tmp / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "output"} for r in inputs.rows]), path)
    inputs.spec["data"]["train"]["path"] = str(path)


def eval_set_without_prompt(inputs: Inputs) -> None:
    path = inputs.tmp / "heldout.jsonl"
    path.write_text("".join(json.dumps({"output": r["output"]}) + "\n" for r in inputs.rows))
    inputs.spec["data"]["eval_sets"] = {"heldout": str(path)}


def model_without_weights(inputs: Inputs) -> None:
    for weights in inputs.model_copy("student").glob("*.safetensors"):
        weights.unlink()


def pickle_weights_only(inputs: Inputs) -> None:
    copy = inputs.model_copy("teacher")
    for weights in copy.glob("*.safetensors"):
        weights.rename(copy / "pytorch_model.bin")


def model_without_config(inputs: Inputs) -> None:
    (inputs.model_copy("student") / "config.json").unlink()


def corrupt_config(inputs: Inputs) -> None:
    (inputs.model_copy("student") / "config.json").write_text("{not json")


def other_tokenizer(inputs: Inputs) -> None:
    tokenizer_file = inputs.model_copy("student") / "tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["zzz-not-in-the-teacher"] = len(vocab)
    tokenizer_file.write_text(json.dumps(tokenizer))


def adapter_that_is_a_model(inputs: Inputs) -> None:
    inputs.spec["models"]["teacher"]["adapter"] = str(inputs.student)


def topk_with_k(k: int) -> Callable[[Inputs], None]:
    def apply(inputs: Inputs) -> None:
        _set(inputs.spec, "distill.teacher_signal", "topk")
        _set(inputs.spec, "teacher_signal.k", k)

    return apply


def override(text: str) -> Callable[[Inputs], None]:
    return lambda inputs: inputs.overrides.append(text)


STAGE = {"epochs": 1, "kd_weight": 0.8, "temperature": 1.0, "lr": 1.0e-4}

# (case id, how to break the valid job, fragments the error must contain)
CASES: list[tuple[str, Callable[[Inputs], None], list[str]]] = [
    # ---- specs: syntax and shape
    ("malformed-yaml", raw_spec("run: {name: x\nmodels: ["), ["malformed YAML"]),
    ("yaml-python-tag", raw_spec("run: !!python/object/apply:os.system ['touch pwned']\n"), ["malformed YAML"]),
    ("not-a-mapping", raw_spec("- run\n- models\n"), ["YAML mapping"]),
    ("empty-spec", raw_spec(""), ["YAML mapping"]),
    ("spec-not-utf8", raw_spec(b"run: {name: \xff}\n"), ["not UTF-8"]),
    ("unknown-top-level-key", spec_case("distil", {"loss": "fkl"}), ["distil (line", "unknown key"]),
    ("unknown-nested-key", spec_case("distill.stagez", []), ["distill.stagez"]),
    ("missing-run-section", drop("run"), ["run"]),
    ("missing-teacher", drop("models.teacher"), ["models.teacher"]),
    ("missing-train-data", drop("data.train"), ["data.train"]),
    ("run-name-with-slash", spec_case("run.name", "a/b"), ["run.name"]),
    ("output-dir-unknown-scheme", spec_case("run.output_dir", "s4://bucket/runs"), ["run.output_dir", "s4://"]),
    ("batch-size-string", spec_case("distill.batch_size", "eight"), ["distill.batch_size", "eight"]),
    ("batch-size-zero", spec_case("distill.batch_size", 0), ["distill.batch_size"]),
    ("num-workers-float", spec_case("distill.num_workers", 1.5), ["distill.num_workers"]),
    ("unknown-loss", spec_case("distill.loss", "kl"), ["distill.loss", "kl"]),
    ("unknown-strategy", spec_case("distill.strategy", "zero3"), ["distill.strategy"]),
    ("unknown-engine", spec_case("engine.name", "tensorrt"), ["engine.name"]),
    ("negative-temperature", spec_case("distill.stages", [{**STAGE, "temperature": -1}]), ["stages[0].temperature"]),
    ("kd-weight-above-1", spec_case("distill.stages", [{**STAGE, "kd_weight": 1.5}]), ["stages[0].kd_weight"]),
    ("zero-steps", spec_case("distill.stages", [{**STAGE, "steps": 0}]), ["stages[0].steps"]),
    ("no-stages", spec_case("distill.stages", []), ["distill.stages"]),
    ("more-stages-than-buckets", spec_case("rank.keep_buckets", 2), ["3 stages", "keep_buckets is 2"]),
    ("keep-more-buckets-than-made", spec_case("rank.num_buckets", 2), ["keep_buckets (3)", "num_buckets (2)"]),
    ("zero-buckets", spec_case("rank.num_buckets", 0), ["rank.num_buckets"]),
    ("teacher-ce-not-reflected", spec_case("rank.signals", [{"name": "teacher_ce", "easier_when": "lower"}]),
     ["teacher_ce"]),
    ("heldout-set-unknown", spec_case("distill.heldout_eval_set", "nope"), ["heldout_eval_set", "nope"]),
    ("no-eval-seeds", spec_case("evaluate.seeds", []), ["evaluate.seeds"]),
    ("negative-prompt-tokens", spec_case("data.max_prompt_tokens", -5), ["data.max_prompt_tokens"]),
    ("tensor-parallel-without-gpus", spec_case("engine.vllm", {"tensor_parallel_size": 2}),
     ["engine.vllm.tensor_parallel_size is 2", "reflect.num_gpus_per_actor"]),
    ("override-without-value", override("distill.num_workers"), ["KEY=VALUE"]),
    ("override-into-missing-list", override("distill.stages.7.lr=1"), ["set the whole list"]),
    ("context-too-long", spec_case("data.max_prompt_tokens", 4000),
     ["data.max_prompt_tokens (4000)", "1024 positions"]),
    # ---- data
    ("train-file-missing", spec_case("data.train.path", "/nonexistent/train.jsonl"), ["does not exist"]),
    ("invalid-json-line", train_lines(lambda lines: [*lines[:4], "{oops", *lines[4:]]), ["bad_train.jsonl:5", "JSON"]),
    ("json-line-not-object", train_lines(lambda lines: [*lines[:2], "[1, 2]", *lines[2:]]), [":3", "JSON object"]),
    ("missing-response-column", rows_with(2, output=_DELETE), ["bad_train.jsonl:3", "'output' is missing"]),
    ("empty-prompt", rows_with(5, prompt="   "), ["bad_train.jsonl:6", "prompt"]),
    ("non-string-response", rows_with(1, output=42), ["bad_train.jsonl:2", "output"]),
    ("non-utf8-bytes", non_utf8_row, ["bad_train.jsonl:4", "UTF-8"]),
    ("duplicate-row", lambda i: i.write_train([i.rows[0], *i.rows]), ["bad_train.jsonl:2", "duplicate"]),
    ("duplicate-id-column", duplicate_ids, ["bad_train.jsonl:2", "duplicate"]),
    ("empty-train-file", lambda inputs: inputs.write_train([]), ["bad_train.jsonl"]),
    ("truncated-parquet", truncated_parquet, ["train.parquet", "Parquet"]),
    ("parquet-missing-column", parquet_without_response, ["train.parquet", "response"]),
    ("prompt-over-limit-not-truncated",
     lambda inputs: inputs.spec["data"].update(max_prompt_tokens=8, truncate_long_prompts=False),
     ["max_prompt_tokens"]),
    ("eval-set-missing-column", eval_set_without_prompt, ["heldout.jsonl:1", "prompt"]),
    # ---- models
    ("model-path-missing", spec_case("models.student.path", "/nonexistent/student"), ["models.student.path"]),
    ("model-without-weights", model_without_weights, ["models.student.path", "safetensors"]),
    ("pickle-weights-only", pickle_weights_only, ["models.teacher.path", "safetensors only"]),
    ("model-without-config", model_without_config, ["models.student.path", "config.json"]),
    ("corrupt-config", corrupt_config, ["student_copy"]),
    ("tokenizers-differ", other_tokenizer, ["tokenizers differ"]),
    ("unknown-hub-model", spec_case("models.teacher.path", "no-such-org/no-such-model"), ["no-such-org/no-such-model"]),
    ("lora-unknown-module", spec_case("models.student.lora", {"target_modules": ["q_proj", "qkv_projj"]}),
     ["models.student.lora.target_modules", "'qkv_projj'", "q_proj"]),
    ("lora-on-output-head", spec_case("models.student.lora", {"target_modules": ["lm_head"]}),
     ["models.student.lora.target_modules", "'lm_head' is the output head"]),
    ("lora-rank-zero", spec_case("models.student.lora", {"r": 0}), ["models.student.lora.r"]),
    ("lora-on-teacher", spec_case("models.teacher.lora", {"r": 8}), ["models.teacher.lora", "unknown key"]),
    ("adapter-missing", spec_case("models.teacher.adapter", "/nonexistent/adapter"),
     ["models.teacher.adapter", "does not exist"]),
    ("adapter-is-a-model", adapter_that_is_a_model, ["models.teacher.adapter", "adapter_config.json"]),
    # ---- training settings
    ("loss-chunk-zero", spec_case("distill.loss_chunk_tokens", 0), ["distill.loss_chunk_tokens", "must be > 0"]),
    ("unknown-precision", spec_case("distill.precision", "bf32-mixed"), ["distill.precision", "bf32-mixed"]),
    ("gpu-on-a-machine-without", spec_case("distill.use_gpu", True), ["distill.use_gpu", "no GPU"]),
    ("keep-no-checkpoints", spec_case("distill.keep_checkpoints", 0), ["distill.keep_checkpoints"]),
    ("unknown-teacher-signal", spec_case("distill.teacher_signal", "logits"), ["distill.teacher_signal", "logits"]),
    ("topk-k-zero", spec_case("teacher_signal.k", 0), ["teacher_signal.k", "must be > 0"]),
    ("topk-k-above-vocab", topk_with_k(5000), ["teacher_signal.k is 5000", "tokens of the models' vocabulary"]),
    ("topk-unknown-dtype", spec_case("teacher_signal.logprob_dtype", "int8"), ["teacher_signal.logprob_dtype"]),
    ("topk-unknown-engine", spec_case("teacher_signal.engine", "onnx"), ["teacher_signal.engine", "onnx"]),
]  # fmt: skip


@pytest.fixture
def inputs(tmp_path, tiny_models, demo_data) -> Inputs:
    rows = [json.loads(line) for line in Path(demo_data["train"]).read_text().splitlines()[:12]]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = {
        "run": {"name": "bad", "output_dir": str(tmp_path / "runs")},
        "ray": {"num_cpus": 1},
        "models": {"teacher": {"path": tiny_models["teacher"]}, "student": {"path": tiny_models["student"]}},
        "data": {"train": {"path": str(train)}, "max_response_tokens": 32},
        "engine": {"name": "transformers"},
    }
    return Inputs(tmp_path, spec, rows, Path(tiny_models["teacher"]), Path(tiny_models["student"]))


def test_the_catalogue_has_at_least_40_cases():
    assert len(CASES) >= 40
    assert len({case_id for case_id, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize(("case_id", "breaks", "fragments"), CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_refused_by_name_before_anything_is_written(inputs, capsys, case_id, breaks, fragments):
    breaks(inputs)
    spec_path = inputs.tmp / "spec.yaml"
    raw = inputs.spec.get("__raw__")
    if isinstance(raw, bytes):
        spec_path.write_bytes(raw)
    else:
        spec_path.write_text(raw if raw is not None else yaml.safe_dump(inputs.spec))
    overrides = [word for text in inputs.overrides for word in ("--set", text)]

    status = main(["run", str(spec_path), *overrides])

    message = capsys.readouterr().err
    assert status == 2, message
    assert message.startswith("error: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert not (inputs.tmp / "runs").exists(), "a refused job must not leave a run directory"
    assert not Path("pwned").exists()
