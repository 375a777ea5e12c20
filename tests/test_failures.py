"""Failures that explain themselves, through the CLI: one ``error:`` line naming the stage, setting, row or
file, and the documented exit code (0 nothing to do, 1 a stage failed, 2 bad input, 130 interrupted)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml

from srd_ray import pipeline
from srd_ray.cli import main
from srd_ray.distill.losses import LossSettings
from srd_ray.distill.worker import LocalHost, StagePlan, Trainer
from srd_ray.evaluate import evaluate_once, evaluation_identity
from srd_ray.failures import StageFailed, explain
from srd_ray.spec import ModelSpec, StageSpec, load_spec
from tests.test_trainer import make_job, step_losses


def spec_file(tmp_path: Path, tiny_models: dict, demo_data: dict, **sections) -> Path:
    spec = {
        "run": {"name": "failing", "output_dir": str(tmp_path / "runs")},
        "ray": {"num_cpus": 2, "object_store_memory_mb": 256},
        "models": {"teacher": {"path": tiny_models["teacher"]}, "student": {"path": tiny_models["student"]}},
        "data": {"train": {"path": demo_data["train"]}, "max_response_tokens": 32},
        "engine": {"name": "transformers"},
        **sections,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_stage_whose_inputs_do_not_exist_names_the_stage_to_run_first(tmp_path, tiny_models, demo_data, capsys):
    spec = spec_file(tmp_path, tiny_models, demo_data)
    assert main(["rank", str(spec)]) == 2
    assert "rank reads the scored reflect shards" in capsys.readouterr().err
    assert main(["run", str(spec), "--stages", "distill"]) == 2
    message = capsys.readouterr().err
    assert "error: distill reads the rank buckets" in message and "--stages rank,distill" in message
    assert not (tmp_path / "runs" / "failing" / "distill").exists()


def test_a_command_with_nothing_to_do_says_why(tmp_path, tiny_models, demo_data, capsys):
    spec = spec_file(tmp_path, tiny_models, demo_data, distill={"curriculum": "none"})
    assert main(["rank", str(spec)]) == 0
    assert "nothing to do: rank is off: distill.curriculum is none" in capsys.readouterr().err
    assert main(["run", str(spec), "--stages", "teacher_signal"]) == 0
    assert "teacher_signal is off: distill.teacher_signal is online" in capsys.readouterr().err


def out_of_memory() -> Exception:
    import ray.exceptions

    return ray.exceptions.OutOfMemoryError(
        "Task was killed due to the node running low on memory.\nMemory on the node (IP: 10.0.0.1, ID: abc) "
        "where the task was running was 22.50GB / 23.47GB (0.958), which exceeds the memory usage threshold"
    )


@pytest.mark.parametrize(
    ("raised", "fragments"),
    [
        (out_of_memory, ["prepare: Ray stopped a worker that ran out of memory", "22.50GB / 23.47GB used",
                         "prepare.tiny_models sizes", "Rerun the same command to resume"]),
        (lambda: RuntimeError("disk quota exceeded\nmore details"), ["prepare failed: RuntimeError: disk quota "
                                                                     "exceeded", "rerunning the same command resumes"]),
    ],
    ids=["out-of-memory", "other"],
)  # fmt: skip
def test_a_failing_stage_says_what_happened_and_that_a_rerun_resumes(
    tmp_path, tiny_models, demo_data, capsys, monkeypatch, raised, fragments
):
    def fail(*args, **kwargs):
        raise raised()

    monkeypatch.setattr(pipeline, "write_demo_data", fail)
    spec = spec_file(tmp_path, tiny_models, demo_data, prepare={"demo_data": {"train_rows": 20}})
    assert main(["run", str(spec), "--stages", "prepare"]) == 1
    message = capsys.readouterr().err
    assert len([line for line in message.splitlines() if line.startswith("error: ")]) == 1
    assert "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, message
    manifest = json.loads((tmp_path / "runs" / "failing" / "run.json").read_text())
    assert manifest["stages"]["prepare"]["status"] == "failed"
    log = (tmp_path / "runs" / "failing" / "logs" / "srd.log").read_text()
    assert "Traceback" in log, "the full traceback is in the run's log"


def test_infrastructure_errors_keep_their_cause_and_are_not_bad_input(tmp_path, tiny_models, demo_data, capsys,
                                                                      monkeypatch):  # fmt: skip
    from srd_ray import models

    def unreachable(*args, **kwargs):
        raise ConnectionError("Max retries exceeded with url: huggingface.co")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", unreachable)
    assert main(["run", str(spec_file(tmp_path, tiny_models, demo_data))]) == 1
    message = capsys.readouterr().err
    assert "ConnectionError: Max retries exceeded" in message and "not the spec" in message


def test_explain_finds_our_errors_inside_ray_wrappers():
    from srd_ray.errors import DataError

    inner = DataError("train.jsonl:3: column 'output' is empty")
    try:
        try:
            raise inner
        except DataError as error:
            raise RuntimeError("Ray wrapped it") from error
    except RuntimeError as wrapped:
        assert explain(wrapped, "reflect") is inner
    assert isinstance(explain(ValueError("x"), "rank"), StageFailed)


def test_evaluate_never_reuses_a_summary_made_for_another_model(tmp_path, tiny_models, demo_data, monkeypatch):
    from srd_ray import evaluate

    spec = load_spec(spec_file(tmp_path, tiny_models, demo_data))
    eval_sets = {"demo": pa.table({"example_id": ["a", "b"]})}
    calls = []
    monkeypatch.setattr(evaluate, "run_evaluate", lambda *args: calls.append(args[4].path) or {"demo": "fresh"})
    out = tmp_path / "evaluate" / "x"
    out.mkdir(parents=True)
    teacher, student = ModelSpec(path=tiny_models["teacher"]), ModelSpec(path=tiny_models["student"])
    identity = evaluation_identity(spec, "transformers", teacher, eval_sets)
    (out / "summary.json").write_text(json.dumps({"identity": identity, "sets": {"demo": "teacher's"}}))
    assert evaluate_once(spec, "transformers", teacher, eval_sets, out) == {"demo": "teacher's"}
    assert evaluate_once(spec, "transformers", student, eval_sets, out) == {"demo": "fresh"}
    assert calls == [tiny_models["student"]]


def test_a_short_stage_still_logs_its_losses(tmp_path, tiny_models, demo_data):
    """Fewer steps than log_every_steps: the last step of each stage is logged, so the summary has losses."""
    from srd_ray.data import load_source
    from srd_ray.spec import DataSourceSpec, DataSpec

    data = DataSpec(train=DataSourceSpec(path=demo_data["train"], max_rows=16), max_response_tokens=32)
    rows = load_source(data.train, data, label="train").table.select(["example_id", "prompt", "response"])
    plan = (StagePlan(0, ("all",), StageSpec(steps=2, kd_weight=0.5, lr=1e-3)),)
    job = make_job(tmp_path, tiny_models, plan=plan, log_every_steps=10)
    assert job.loss == LossSettings("fkl")
    Trainer(job, LocalHost({"all": rows}, tmp_path / "ck", torch.device("cpu"))).run()
    assert list(step_losses(tmp_path)) == [2]


@pytest.mark.slow
def test_a_training_failure_reports_its_real_cause(tmp_path, tiny_models, demo_data, capsys):
    """A teacher whose weights are corrupt fails in the training workers (the spec checks cannot see it):
    the message names the teacher's weights, not an interruption."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_models["teacher"], teacher)
    weights = next(teacher.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    spec = spec_file(tmp_path, {**tiny_models, "teacher": str(teacher)}, demo_data,
                     distill={"curriculum": "none", "num_workers": 1, "max_failures": 0,
                              "stages": [{"steps": 2}]})  # fmt: skip
    assert main(["run", str(spec), "--stages", "distill"]) == 2
    message = capsys.readouterr().err
    assert "cannot load model from" in message and str(teacher) in message and "interrupted" not in message
