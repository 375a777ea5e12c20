"""End to end on the session's local Ray: a reduced quickstart, reruns, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from transformers import AutoModelForCausalLM

from srd_ray import pipeline
from srd_ray.cli import main
from srd_ray.errors import DataError, RunDirError
from srd_ray.pipeline import run_pipeline
from srd_ray.spec import load_spec

REDUCED_QUICKSTART = """\
run: {name: reduced, output_dir: OUT, seed: 0}
ray: {num_cpus: 2}
prepare:
  demo_data: {train_rows: 160, heldout_rows: 24, pretrain_rows: 400, seed: 0}
  tiny_models:
    vocab_size: 400
    teacher: {hidden_size: 64, num_layers: 2, num_heads: 2, pretrain_steps: 30}
    student: {hidden_size: 32, num_layers: 1, num_heads: 1, pretrain_steps: 30}
    pretrain_batch_size: 16
models:
  teacher: {path: "${run_dir}/prepare/teacher"}
  student: {path: "${run_dir}/prepare/student"}
data:
  train: {path: "${run_dir}/prepare/demo_train.jsonl"}
  eval_sets: {demo_heldout: "${run_dir}/prepare/demo_heldout.jsonl"}
  max_response_tokens: 32
teacher_sft: {enabled: true, epochs: 1, lr: 1.0e-3, num_workers: 1, batch_size: 16}
engine: {name: transformers}
reflect: {concurrency: 2, batch_size: 16, shard_rows: 50, generation: {max_new_tokens: 8}}
distill:
  num_workers: 2
  batch_size: 8
  log_every_steps: 2
  stages:
    - {epochs: 1, kd_weight: 0.8, temperature: 1.0, lr: 1.0e-3}
    - {epochs: 1, kd_weight: 0.9, temperature: 1.5, lr: 1.0e-3}
    - {epochs: 1, kd_weight: 1.0, temperature: 2.0, lr: 1.0e-3}
evaluate: {seeds: [10, 20], batch_size: 16, generation: {max_new_tokens: 8}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text).replace("OUT", str(tmp_path / "runs")))
    return path


# The console of a run is srd-ray's own lines: per stage a start, a progress line at most every 10 s and one
# at its end, a completion; then errors. Six stages of this run take well under a minute each.
CONSOLE_LINE_BUDGET = 60


@pytest.mark.slow
def test_reduced_quickstart_end_to_end(tmp_path, ray_session, monkeypatch):
    spec_path = write(tmp_path, REDUCED_QUICKSTART)
    spec = load_spec(spec_path)
    # As a user runs it (its own local Ray, output not a terminal: plain progress lines).
    result = subprocess.run([sys.executable, "-m", "srd_ray.cli", "run", str(spec_path)], capture_output=True,
                            text=True, timeout=900)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stderr.splitlines()
    assert len(console) <= CONSOLE_LINE_BUDGET, "\n".join(console)
    assert all(" srd_ray." in line for line in console), "only srd-ray's own lines reach the console"
    for stage in ("reflect", "distill", "evaluate"):
        assert any(f"srd_ray.progress: {stage}" in line and "ETA" in line for line in console), stage
    assert "run reduced" in result.stdout and "ROUGE-L" in result.stdout
    run_dir = Path(spec.run_dir)
    log = (run_dir / "logs" / "srd.log").read_text()
    assert "Started a local Ray instance" in log, "Ray's own logs go to the run's log file"
    manifest = json.loads((run_dir / "run.json").read_text())
    stages = manifest["stages"]
    assert [s for s in stages if stages[s]["status"] == "complete"] == [
        "prepare", "teacher_sft", "reflect", "rank", "distill", "evaluate",
    ]  # fmt: skip
    assert json.loads((run_dir / "run.json").read_text())["versions"]["ray"] == "2.60.0"

    # Reflect: every input row scored exactly once, joined by example_id.
    train_ids = {json.loads(line)["prompt"] for line in (run_dir / "prepare/demo_train.jsonl").read_text().splitlines()}
    scored = pq.read_table(run_dir / "reflect/shards")
    assert scored.num_rows == len(train_ids) == 160
    assert len(set(scored["example_id"].to_pylist())) == 160
    assert stages["reflect"]["summary"]["shards"] == 4

    # Rank: the demo data has a task column, so (rank.stratify_by: auto) each of its 4 tasks is ranked on its
    # own, 1..40, and cut into 4 equal buckets; the last one is dropped from training.
    rank = stages["rank"]["summary"]
    assert rank["stratify_by"] == "task"
    assert [b["rows"] for b in rank["buckets"]] == [40, 40, 40, 40] and rank["dropped_rows"] == 40
    ranked = pa.concat_tables([pq.read_table(path) for path in sorted((run_dir / "rank").glob("bucket=*/*.parquet"))])
    for task in set(ranked["task"].to_pylist()):
        within = ranked.filter(pc.equal(ranked["task"], task))
        assert sorted(within["difficulty_rank"].to_pylist()) == list(range(1, 41)), task
        assert [within["bucket"].to_pylist().count(b) for b in range(4)] == [10, 10, 10, 10], task

    # Distill: 3 stages on 2 gloo workers; the student is saved in save_pretrained format and loads.
    distill = stages["distill"]["summary"]
    assert [s["stage"] for s in distill["stages"]] == [0, 1, 2]
    # stage s trains on 40*(s+1) rows split over 2 workers at batch 8: 3 + 5 + 8 optimizer steps
    assert distill["optimizer_steps"] == 16 and distill["tokens_seen"] > 0
    assert any((run_dir / "distill/model").glob("*.safetensors"))
    student = AutoModelForCausalLM.from_pretrained(run_dir / "distill/model")
    assert student.config.num_hidden_layers == 1

    # Evaluate: teacher, student before and after, 2 seeds each, every prediction present.
    evaluation = stages["evaluate"]["summary"]
    assert set(evaluation) == {"teacher", "student_before", "student_after"}
    assert evaluation["student_after"]["demo_heldout"]["seeds"] == [10, 20]
    predictions = pq.read_table(run_dir / "evaluate/student_after/predictions.parquet")
    assert predictions.num_rows == 2 * 24

    # A rerun finds every stage complete and redoes nothing, without starting Ray.
    finished = {name: record["finished"] for name, record in stages.items()}
    monkeypatch.setattr(pipeline, "ensure_ray", lambda *a, **k: pytest.fail("a finished run started Ray"))
    again = run_pipeline(load_spec(write(tmp_path, REDUCED_QUICKSTART)))
    monkeypatch.undo()
    assert {name: record["finished"] for name, record in again["stages"].items()} == finished
    assert pa.default_memory_pool().backend_name == "system", "the driver's Arrow memory is handed back"

    # The report has every plot; compare and evaluate --model work on the finished run.
    assert main(["report", str(run_dir)]) == 0
    for name in ("report.html", "signals.png", "buckets.png", "stage_rows.png", "loss.png"):
        assert (run_dir / "report" / name).stat().st_size > 0
    page = (run_dir / "report/report.html").read_text()
    assert "true difficulty" in page and "demo_heldout" in page
    assert main(["compare", str(run_dir), str(run_dir), "--out", str(tmp_path / "compare.md")]) == 0
    assert "1.00x" in (tmp_path / "compare.md").read_text()
    spec_path = write(tmp_path, REDUCED_QUICKSTART)
    assert main(["evaluate", str(spec_path), "--model", str(run_dir / "distill/model"), "--name", "again"]) == 0
    rescored = json.loads((run_dir / "evaluate/again/summary.json").read_text())["sets"]["demo_heldout"]
    assert rescored["rouge_l"] == pytest.approx(evaluation["student_after"]["demo_heldout"]["rouge_l"])

    # Changed rank settings: rank is stale and refuses to mix unless redone; redo reruns rank and after.
    # Refused before Ray is asked for, and before an earlier selected stage would run.
    changed = load_spec(write(tmp_path, REDUCED_QUICKSTART), ["rank.k=10"])
    monkeypatch.setattr(pipeline, "ensure_ray", lambda *a, **k: pytest.fail("a refused run asked for Ray"))
    for stages in (["rank"], ["reflect", "rank", "distill"]):
        with pytest.raises(RunDirError, match=r"rank.k: 60 -> 10.*--redo rank"):
            run_pipeline(changed, stages=stages)
    monkeypatch.undo()
    assert main(["rank", str(write(tmp_path, REDUCED_QUICKSTART)), "--set", "rank.k=10", "--redo"]) == 0
    redone = json.loads((run_dir / "run.json").read_text())
    assert redone["stages"]["rank"]["summary"]["k"] == 10
    assert "distill" not in redone["stages"]  # downstream outputs were removed with it
    assert not (run_dir / "distill").exists()


def test_bad_data_fails_before_writing_anything(tmp_path, tiny_models, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "output": "b"}\n{"prompt": "c", "output": ""}\n')
    spec_text = f"""\
    run: {{name: bad, output_dir: {tmp_path / "runs"}}}
    models:
      teacher: {{path: {tiny_models["teacher"]}}}
      student: {{path: {tiny_models["student"]}}}
    data:
      train: {{path: {data}}}
    """
    spec_path = tmp_path / "bad.yaml"
    spec_path.write_text(textwrap.dedent(spec_text))
    assert main(["run", str(spec_path)]) == 2
    assert f"{data}:2: column 'output' is empty" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(DataError):
        run_pipeline(load_spec(spec_path))


def test_missing_model_fails_before_writing_anything(tmp_path, demo_data, capsys):
    spec_path = tmp_path / "missing.yaml"
    spec_path.write_text(
        f"run: {{name: m, output_dir: {tmp_path / 'runs'}}}\n"
        f"models: {{teacher: {{path: {tmp_path / 'no-teacher'}}}, student: {{path: {tmp_path / 'no-student'}}}}}\n"
        f"data: {{train: {{path: {demo_data['train']}}}}}\n"
    )
    assert main(["run", str(spec_path)]) == 2
    assert f"models.teacher.path: {tmp_path / 'no-teacher'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def chat_quickstart(text: str = REDUCED_QUICKSTART) -> str:
    """The reduced quickstart on chat rows and the tiny ChatML pair, with a stored top-k teacher signal."""
    text = text.replace("train_rows: 160, heldout_rows: 24", "train_rows: 80, heldout_rows: 12")  # a shorter run
    text = text.replace("evaluate: {seeds: [10, 20],", "evaluate: {seeds: [10],")
    text = text.replace("pretrain_rows: 400, seed: 0}", "pretrain_rows: 400, seed: 0, chat: true}")
    text = text.replace("    vocab_size: 400\n", "    vocab_size: 400\n    chat: true\n")
    return text.replace("distill:\n", "teacher_signal: {k: 16}\ndistill:\n  teacher_signal: topk\n")


@pytest.mark.slow
def test_chat_quickstart_end_to_end_with_topk_then_mixed_generation(tmp_path, ray_session):
    """#30: chat rows (messages) on a ChatML pair through every stage: each model renders them with its chat
    template, the teacher pass stores exactly the assistant tokens training scores, evaluation answers the
    rendered conversation and lm-eval scores every model on the demo data's multiple-choice task (rendered
    with each model's chat template); then distill again with mixed on-policy generation on the same rows."""
    from transformers import AutoTokenizer

    from srd_ray.encoding import RowFormat, prompts_of
    from srd_ray.report import compare_runs, summary_lines

    tasks = "'${run_dir}/prepare/lm_eval_tasks'"
    lm_eval = f"lm_eval: {{tasks: [srd_demo_facts], include_path: {tasks}, apply_chat_template: true}}}}"
    evaluate = "evaluate: {seeds: [10], batch_size: 16, generation: {max_new_tokens: 8}"
    text = chat_quickstart().replace(evaluate + "}", f"{evaluate}, {lm_eval}")
    spec = load_spec(write(tmp_path, text))
    manifest = run_pipeline(spec)
    run_dir = Path(spec.run_dir)
    # lm-eval beside ROUGE-L: every evaluated model scored on the demo task, in run.json, the console
    # summary and srd compare.
    benchmarks = manifest["stages"]["lm_eval"]["summary"]
    assert set(benchmarks) == {"teacher", "student_before", "student_after"}
    assert all("srd_demo_facts" in scores for scores in benchmarks.values())
    assert 0 <= benchmarks["student_after"]["srd_demo_facts"]["acc"] <= 1
    lines = summary_lines(manifest)
    assert any("lm-eval (x100)" in line for line in lines) and any("srd_demo_facts acc" in line for line in lines)
    assert "lm-eval srd_demo_facts acc" in compare_runs([run_dir])
    print("\n".join(lines))  # the note quotes this summary
    assert all(manifest["stages"][s]["status"] == "complete" for s in ("reflect", "teacher_signal", "evaluate"))
    scored = pq.read_table(run_dir / "reflect/shards")
    assert scored.num_rows == 80 and "messages" in scored.column_names
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "prepare/student")
    row = scored.slice(0, 1)
    example = RowFormat(tokenizer, spec.data).example(prompts_of(row)[0], row["response"][0].as_py())
    assert tokenizer.decode([t for t in example.labels if t >= 0]) == row["response"][0].as_py() + "<|im_end|>"
    assert tokenizer.decode(example.input_ids).startswith("<|im_start|>user\n")
    signal = pq.read_table(run_dir / "teacher_signal/shards", columns=["example_id", "num_tokens"])
    counts = dict(zip(signal["example_id"].to_pylist(), signal["num_tokens"].to_pylist(), strict=True))
    assert counts[row["example_id"][0].as_py()] == example.scored_tokens
    predictions = pq.read_table(run_dir / "evaluate/student_after/predictions.parquet")
    assert "messages" in predictions.column_names and predictions.num_rows == 12

    overrides = ["distill.teacher_signal=online", "distill.loss=jsd", "distill.student_generation.mode=mixed",
                 "distill.student_generation.mixed_alpha=1.0", "distill.num_workers=1"]  # fmt: skip
    mixed = load_spec(write(tmp_path, chat_quickstart()), overrides)
    run_pipeline(mixed, stages=["distill"], redo=["distill"])
    metrics = [json.loads(line) for line in (run_dir / "distill/metrics.jsonl").read_text().splitlines()]
    sources = [m["sources"] for m in metrics if "sources" in m]
    assert sources and any(s.get("samples", 0) + s.get("buffer", 0) > 0 for s in sources), sources


FREED_IN_THE_MIDDLE = """
import os
from srd_ray.pipeline import hand_freed_memory_back

def resident_mb():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

blocks = [bytes(4096) for _ in range(20_000)]  # 80 MB of glibc heap blocks (too big for Python's own pools)
pinned = bytes(4096)  # allocated last: the heap's top stays in use, so glibc cannot shrink it by itself
del blocks
freed = resident_mb()
hand_freed_memory_back()
print(freed - resident_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not Path("/proc/self/statm").exists(), reason="glibc")
def test_the_driver_hands_memory_freed_inside_its_heap_back_to_the_system():
    """glibc keeps freed blocks that lie below live ones; the driver trims after loading data and after
    every stage (``run_pipeline``), so a stage's freed tables do not stay part of it."""
    done = subprocess.run([sys.executable, "-c", FREED_IN_THE_MIDDLE], capture_output=True, text=True, check=True)
    assert float(done.stdout) > 60, f"handed back {done.stdout.strip()} MB of 80 MB freed"
