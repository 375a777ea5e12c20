"""Spec validation: errors name the YAML path, the bad value and the line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from srd_ray.cli import main
from srd_ray.errors import SpecError
from srd_ray.spec import load_spec

MINIMAL = """\
run: {name: t, output_dir: OUT}
models:
  teacher: {path: /models/teacher}
  student: {path: /models/student}
data:
  train: {path: /data/train.jsonl}
"""


def write_spec(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text).replace("OUT", str(tmp_path / "runs")))
    return path


def spec_error(tmp_path: Path, text: str, overrides: list[str] | None = None) -> str:
    with pytest.raises(SpecError) as caught:
        load_spec(write_spec(tmp_path, text), overrides)
    return str(caught.value)


def test_minimal_spec_gets_srd_release_defaults(tmp_path):
    spec = load_spec(write_spec(tmp_path, MINIMAL))
    assert [s.kd_weight for s in spec.distill.stages] == [0.8, 0.9, 1.0]
    assert [s.temperature for s in spec.distill.stages] == [1.0, 1.5, 2.0]
    assert (spec.rank.k, spec.rank.num_buckets, spec.rank.keep_buckets) == (60, 4, 3)
    assert spec.reflect.generation.temperature == 0.01 and spec.reflect.generation.no_repeat_ngram_size == 6
    assert spec.evaluate.seeds == [10, 20, 30, 40, 50] and spec.evaluate.generation.temperature == 1.0
    assert spec.data.max_prompt_tokens == 256 and spec.data.max_response_tokens == 256
    assert spec.models.teacher.trust_remote_code is False
    assert spec.run_dir == str(tmp_path / "runs" / "t")


def test_negative_temperature_names_path_value_and_line(tmp_path):
    text = MINIMAL + "distill:\n  stages:\n    - {kd_weight: 0.8}\n    - {temperature: -1}\n"
    message = spec_error(tmp_path, text)
    assert "distill.stages[1].temperature (line 10): must be > 0, got -1" in message


def test_unknown_key_is_rejected_with_its_path(tmp_path):
    message = spec_error(tmp_path, MINIMAL + "rank: {num_bukets: 4}\n")
    assert "rank.num_bukets (line 7): unknown key" in message


def test_wrong_type_and_missing_section(tmp_path):
    message = spec_error(tmp_path, "run: {name: t}\nreflect: {batch_size: many}\n")
    assert "reflect.batch_size (line 2)" in message and "'many'" in message
    assert "models: required key is missing" in message
    assert "data: required key is missing" in message


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("distill: {stages: [{kd_weight: 1.5}]}\n", "distill.stages[0].kd_weight (line 7): must be <= 1, got 1.5"),
        ("distill: {loss: kl}\n", "distill.loss (line 7): must be one of 'fkl', 'rkl', 'jsd', 'tvd', 'skl', 'srkl'"),
        ("rank: {num_buckets: 2, keep_buckets: 3}\n", "keep_buckets (3) must be <= num_buckets (2)"),
        ("rank: {keep_buckets: 2}\n", "distill.stages has 3 stages but rank.keep_buckets is 2"),
        ("evaluate: {seeds: []}\n", "evaluate.seeds (line 7): needs at least 1 item(s)"),
        ("run: {name: 'bad name'}\n", "run.name"),
    ],
)
def test_impossible_settings(tmp_path, extra, expected):
    assert expected in spec_error(tmp_path, MINIMAL + extra)


def test_malformed_yaml_and_non_mapping(tmp_path):
    assert "malformed YAML" in spec_error(tmp_path, "run: {name: [unclosed\n")
    assert "a job spec is a YAML mapping" in spec_error(tmp_path, "- just\n- a list\n")


def test_overrides_and_run_dir_interpolation(tmp_path):
    text = MINIMAL.replace("/data/train.jsonl", '"${run_dir}/prepare/train.jsonl"')
    text += "distill: {stages: [{lr: 0.1}, {lr: 0.2}]}\n"
    spec = load_spec(write_spec(tmp_path, text), ["distill.num_workers=3", "distill.stages.1.lr=0.5", "rank.k=10"])
    assert spec.distill.num_workers == 3 and spec.distill.stages[1].lr == 0.5 and spec.rank.k == 10
    assert spec.data.train.path == str(tmp_path / "runs" / "t" / "prepare" / "train.jsonl")
    assert "expected KEY=VALUE" in spec_error(tmp_path, MINIMAL, ["distill.num_workers"])
    assert "set the whole list" in spec_error(tmp_path, MINIMAL, ["distill.stages.0.lr=1"])


def test_relative_paths_become_absolute_but_hub_ids_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = MINIMAL.replace("/models/teacher", "gpt2-xl").replace("/models/student", "./student")
    spec = load_spec(write_spec(tmp_path, text.replace("/data/train.jsonl", "databricks/databricks-dolly-15k")))
    assert spec.models.teacher.path == "gpt2-xl"
    assert spec.models.student.path == str(tmp_path / "student")
    assert spec.data.train.path == "databricks/databricks-dolly-15k"


def test_cli_validate_prints_resolved_spec_and_fails_cleanly(tmp_path, capsys):
    assert main(["validate", str(write_spec(tmp_path, MINIMAL))]) == 0
    assert "kd_weight: 0.9" in capsys.readouterr().out
    bad = write_spec(tmp_path, MINIMAL + "distill: {stages: [{temperature: 0}]}\n")
    assert main(["validate", str(bad)]) == 2
    assert "distill.stages[0].temperature (line 7): must be > 0, got 0" in capsys.readouterr().err


def test_every_job_spec_in_jobs_validates():
    jobs = sorted((Path(__file__).resolve().parents[1] / "jobs").glob("*.yaml"))
    assert jobs, "jobs/ has no specs"
    for job in jobs:
        load_spec(job)


def test_unquoted_on_and_off_are_the_choices_not_booleans(tmp_path):
    """YAML 1.1 reads ``mode: on`` as true: the choice takes it, in the file and from --set (#31)."""
    text = MINIMAL + "distill:\n  loss: jsd\n  student_generation: {mode: on}\n"
    assert load_spec(write_spec(tmp_path, text)).distill.student_generation.mode == "on"
    spec = load_spec(write_spec(tmp_path, MINIMAL), ["distill.loss=jsd", "distill.student_generation.mode=on"])
    assert spec.distill.student_generation.mode == "on"
    spec = load_spec(write_spec(tmp_path, MINIMAL), ["distill.student_generation.mode=off"])
    assert spec.distill.student_generation.mode == "off"
    assert "mode" in spec_error(tmp_path, MINIMAL, ["distill.student_generation.mode=yes please"])


def test_the_teacher_dtype_is_one_setting_and_its_old_name_still_validates(tmp_path):
    """#31: ``models.teacher.dtype`` (default auto) for every pass that runs the teacher; the old
    ``distill.teacher_dtype`` moves there with a warning, unless the teacher sets a dtype of its own."""
    assert load_spec(write_spec(tmp_path, MINIMAL)).models.teacher.dtype == "auto"
    old = MINIMAL + "distill: {teacher_dtype: bfloat16}\n"
    with pytest.warns(FutureWarning, match=r"distill.teacher_dtype is deprecated: set models.teacher.dtype \(now bf"):
        spec = load_spec(write_spec(tmp_path, old))
    assert spec.models.teacher.dtype == "bfloat16" and "teacher_dtype" not in spec.distill.model_dump()
    with pytest.warns(FutureWarning, match="deprecated"):
        spec = load_spec(write_spec(tmp_path, MINIMAL), ["distill.teacher_dtype=float16"])
    assert spec.models.teacher.dtype == "float16"
    both = old.replace("teacher: {path: /models/teacher}", "teacher: {path: /models/teacher, dtype: float32}")
    with pytest.warns(FutureWarning, match="which this spec also sets, and which wins"):
        assert load_spec(write_spec(tmp_path, both)).models.teacher.dtype == "float32"
    assert "models.student.dtype" in spec_error(tmp_path, MINIMAL.replace("student}", "student, dtype: auto}"))
    with pytest.warns(FutureWarning, match="now float8"):  # a bad old value: the warning says where it went
        assert "models.teacher.dtype" in spec_error(tmp_path, MINIMAL, ["distill.teacher_dtype=float8"])


def test_every_auto_resolves_by_one_rule():
    """#31: precision, a frozen model's weights, trained weights and the engine, from the facts of the
    process that computes (on a GPU, with native bfloat16)."""
    import importlib.util

    from srd_ray import auto

    assert [auto.precision("auto", *facts) for facts in ((False, False), (True, True), (True, False))] == [
        "fp32", "bf16-mixed", "fp16-mixed"]  # fmt: skip
    assert [auto.frozen_weights_dtype("auto", *facts) for facts in ((False, False), (True, True), (True, False))] == [
        "float32", "bfloat16", "float16"]  # fmt: skip
    assert auto.precision("fp16-mixed", False, False) == "fp16-mixed"
    assert auto.frozen_weights_dtype("float16", False, False) == "float16"
    assert auto.trained_weights_dtype("auto") == "float32" and auto.trained_weights_dtype("bfloat16") == "bfloat16"
    installed = importlib.util.find_spec("vllm") is not None
    assert auto.engine("auto") == ("vllm" if installed else "transformers")
    assert auto.engine("transformers") == "transformers"
    assert auto.device_facts("cpu") == (False, False)


def test_an_lm_eval_folder_must_exist_unless_the_demo_data_writes_it(tmp_path):
    lm_eval = "evaluate: {lm_eval: {tasks: [t], include_path: FOLDER}}\n"
    missing = MINIMAL + lm_eval.replace("FOLDER", str(tmp_path / "nowhere"))
    assert "evaluate.lm_eval.include_path must be a folder" in spec_error(tmp_path, missing)
    written = MINIMAL + "prepare: {demo_data: {}}\n" + lm_eval.replace("FOLDER", "'${run_dir}/prepare/lm_eval_tasks'")
    assert load_spec(write_spec(tmp_path, written)).evaluate.lm_eval.include_path.endswith("prepare/lm_eval_tasks")
