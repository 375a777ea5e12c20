"""The stored top-k teacher signal: the pass's core, its checks, the sparse losses, training without a
teacher model, and the stage in a pipeline."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest
import torch

import srd_ray.teacher_signal as signal_module
from srd_ray.data import load_source
from srd_ray.distill.losses import (
    KD_LOSS_NAMES,
    TEMPERATURE_SCALINGS,
    DenseTeacher,
    Head,
    LossSettings,
    SparseTeacher,
    tempered_tail,
)
from srd_ray.distill.strategy import unwrap
from srd_ray.distill.worker import SIGNAL_DATASET, LocalHost, StagePlan, Trainer
from srd_ray.engines import TransformersEngine, topk_of
from srd_ray.errors import DataError, RunDirError
from srd_ray.shards import ShardedPass
from srd_ray.spec import DataSourceSpec, DataSpec, ModelSpec, StageSpec
from srd_ray.storage import Location
from srd_ray.teacher_signal import (
    SETTINGS_KEY,
    check_signal,
    score_signal,
    signals_by_id,
    tail_mass,
    unique_rows,
    warn_about_tail_mass,
)
from tests.test_trainer import make_job, step_losses

DATA = DataSpec(train=DataSourceSpec(path="unused"), max_response_tokens=32)


@pytest.fixture(scope="module")
def rows(demo_data) -> pa.Table:
    data = DataSpec(train=DataSourceSpec(path=demo_data["train"], max_rows=32), max_response_tokens=32)
    table = load_source(data.train, data, label="train").table
    return table.select(["example_id", "input_position", "prompt", "response"])


@pytest.fixture(scope="module")
def teacher_engine(tiny_models) -> TransformersEngine:
    return TransformersEngine(ModelSpec(path=tiny_models["teacher"]), DATA, max_new_tokens=1, batch_size=8)


def sparse_from_dense(teacher_logits: torch.Tensor, k: int, temperatures: tuple[float, ...] = ()) -> SparseTeacher:
    """What the teacher pass stores (the transformers engine's top-k), with exact tempered tails."""
    ids, logprobs, tail, tempered, _ = topk_of(teacher_logits, k, temperatures)
    return SparseTeacher(ids.long(), logprobs, tail, tempered, temperatures)


def response_log_probs(teacher_engine: TransformersEngine, row: dict) -> torch.Tensor:
    """The teacher's full log-softmax at each response token of ``row``, tokenized as training does (the
    response cut to 31 tokens + EOS), computed here independently of the engine's own path."""
    tokenizer = teacher_engine.tokenizer
    prompt_ids = tokenizer(row["prompt"])["input_ids"]
    response_ids = [*tokenizer(row["response"], add_special_tokens=False)["input_ids"][:31], tokenizer.eos_token_id]
    with torch.no_grad():
        logits = teacher_engine.model(input_ids=torch.tensor([prompt_ids + response_ids])).logits[0]
    return torch.log_softmax(logits[len(prompt_ids) - 1 : -1], -1)


@pytest.mark.parametrize(("name", "temperature", "scaling"),
                         list(itertools.product(KD_LOSS_NAMES, (1.0, 2.0), TEMPERATURE_SCALINGS)))  # fmt: skip
def test_sparse_loss_with_every_token_equals_the_dense_loss(name, temperature, scaling):
    """k = vocabulary: no tail, no approximation; value and student gradient match the dense form."""
    torch.manual_seed(0)
    teacher_logits, vocab = torch.randn(7, 11), 11
    settings = LossSettings(name, scaling)
    dense_input = torch.randn(7, vocab, requires_grad=True)
    sparse_input = dense_input.detach().clone().requires_grad_()
    dense = DenseTeacher(Head(torch.eye(vocab), None, vocab), teacher_logits).kd(dense_input, slice(None), settings,
                                                                                   temperature)  # fmt: skip
    sparse = sparse_from_dense(teacher_logits, vocab, (temperature,)).kd(sparse_input, slice(None), settings,
                                                                         temperature)  # fmt: skip
    dense.sum().backward()
    sparse.sum().backward()
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse_input.grad, dense_input.grad, rtol=1e-5, atol=1e-6)


def test_sparse_loss_is_the_divergence_over_k_plus_one_buckets():
    """k = 2 of 5 tokens, T = 1: KL between the two 3-bucket distributions (top 2 + tail), by hand."""
    teacher = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    student_probs = torch.tensor([[0.2, 0.4, 0.1, 0.1, 0.2]])
    sparse = sparse_from_dense(teacher, 2)
    value = sparse.kd(torch.log(student_probs), slice(None), LossSettings("fkl"), 1.0).item()
    p, q = [0.5, 0.3, 0.2], [0.2, 0.4, 0.4]
    assert value == pytest.approx(sum(a * np.log(a / b) for a, b in zip(p, q, strict=True)), rel=1e-5)
    # At T = 2 the top 2 are re-tempered exactly. The tail's tempered mass is the stored one when the pass
    # stored T = 2 (here sqrt(.1) + sqrt(.06) + sqrt(.04)), else the extrapolated one.
    q_full = np.sqrt(student_probs[0].numpy()) / np.sqrt(student_probs[0].numpy()).sum()
    q2 = [q_full[0], q_full[1], q_full[2:].sum()]
    stored = sparse_from_dense(teacher, 2, (1.5, 2.0))
    extrapolated = tempered_tail(sparse.logprobs, sparse.tail, 5, 2.0).exp().item()
    for teacher_signal, tail in [(stored, np.sqrt([0.1, 0.06, 0.04]).sum()), (sparse, extrapolated)]:
        value = teacher_signal.kd(torch.log(student_probs), slice(None), LossSettings("fkl"), 2.0).item()
        p2 = np.array([np.sqrt(0.5), np.sqrt(0.3), tail])
        p2 /= p2.sum()
        assert value == pytest.approx(4 * sum(a * np.log(a / b) for a, b in zip(p2, q2, strict=True)), rel=1e-5)


@pytest.mark.parametrize("exponent", [0.8, 1.0, 1.3])
def test_the_tempered_tail_of_a_power_law_is_extrapolated_from_the_top_k(exponent):
    """For a Zipf-shaped distribution the extrapolated tail mass at T 1.5 and 2 is within 3% of the exact
    sum over the tail; at T = 1 it is the stored tail itself."""
    vocab, k = 50_000, 64
    log_probs = torch.log_softmax(-exponent * torch.log(torch.arange(1, vocab + 1, dtype=torch.float64)), 0)
    top, tail = log_probs[:k].float()[None], torch.logsumexp(log_probs[k:], 0).float()[None]
    assert tempered_tail(top, tail, vocab, 1.0).item() == tail.item()
    for temperature in (1.5, 2.0):
        exact = torch.logsumexp(log_probs[k:] / temperature, 0).item()
        assert abs(tempered_tail(top, tail, vocab, temperature).item() - exact) < 0.03


def test_score_signal_holds_the_teachers_top_k_at_each_response_token(rows, teacher_engine):
    temperatures = (1.5, 2.0)
    signal = score_signal(rows.slice(0, 6), teacher_engine, k=8, logprob_dtype="float16", temperatures=temperatures)
    assert signal.schema.field("topk_logprobs").type == pa.list_(pa.float16())
    assert signal.schema.field("topk_ids").type == pa.list_(pa.int32())
    by_id = signals_by_id(signal, temperatures)
    for row in rows.slice(0, 6).to_pylist():
        log_probs = response_log_probs(teacher_engine, row)
        top = log_probs.topk(8, -1)
        stored = by_id[row["example_id"]]
        assert stored.ids.shape == (len(log_probs), 8)
        np.testing.assert_array_equal(stored.ids, top.indices.numpy())
        np.testing.assert_allclose(stored.logprobs, top.values.numpy(), rtol=2e-3, atol=2e-3)  # float16
        expected_tail = torch.log1p(-top.values.exp().sum(-1)).numpy()
        np.testing.assert_allclose(stored.tail, expected_tail, rtol=1e-4, atol=1e-5)
        outside = log_probs.scatter(-1, top.indices, float("-inf"))
        for column, temperature in enumerate(temperatures):
            expected = torch.logsumexp(outside / temperature, -1).numpy()
            np.testing.assert_allclose(stored.tempered_tails[:, column], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(DataError, match=r"not one per training temperature \[2.0\]"):
        signals_by_id(signal, (2.0,))


def test_tail_mass_is_the_tempered_mass_outside_the_top_k(rows, teacher_engine, caplog, monkeypatch):
    """The pass's summary of its own approximation: per temperature, the mean share of the teacher's tempered
    distribution outside the stored top k, as the full softmax gives it; shares above 20% are warned about."""
    temperatures, k = (1.5, 2.0), 8
    signal = score_signal(rows.slice(0, 6), teacher_engine, k=k, logprob_dtype="float32", temperatures=temperatures)
    shares = {1.0: [], 1.5: [], 2.0: []}
    for row in rows.slice(0, 6).to_pylist():
        log_probs = response_log_probs(teacher_engine, row).double()
        for temperature, values in shares.items():
            tempered = torch.softmax(log_probs / temperature, -1)
            outside = 1 - tempered.gather(-1, log_probs.topk(k, -1).indices).sum(-1)
            values.extend(outside.tolist())
    mass, ids_per_token = tail_mass([signal.slice(0, 2), signal.slice(2)], temperatures)  # summed over shards
    assert ids_per_token == k
    assert list(mass) == ["1", "1.5", "2"] and mass["1"] < mass["1.5"] < mass["2"]
    for temperature, values in shares.items():
        assert mass[f"{temperature:g}"] == pytest.approx(np.mean(values), abs=2e-4)
    monkeypatch.setattr(signal_module, "TAIL_MASS_BATCH_ROWS", 1)  # summed a row at a time: the same
    by_row, ids_by_row = tail_mass([signal], temperatures)
    assert by_row == pytest.approx(mass, abs=1e-4) and ids_by_row == ids_per_token
    caplog.clear()
    warn_about_tail_mass({"1": 0.05, "2": 0.31}, str(k))
    (warning,) = caplog.records
    assert warning.getMessage().startswith("teacher_signal: at T 2 the teacher keeps 31% of its tempered mass "
                                           "outside the stored top 8,")  # fmt: skip


def test_adaptive_k_keeps_each_tokens_fewest_ids_covering_its_hottest_tempered_mass(rows, teacher_engine):
    """k adaptive: per token the fewest most-likely ids whose mass in the teacher's distribution tempered at
    the hottest stage temperature reaches the coverage (at most max_k); only those are stored, with their
    count, and read back as [tokens, the row's largest count] with padding (first id, -inf)."""
    temperatures, coverage, max_k = (1.5, 2.0), 0.5, 400
    signal = score_signal(rows.slice(0, 6), teacher_engine, k=max_k, logprob_dtype="float32",
                          temperatures=temperatures, coverage=coverage)  # fmt: skip
    assert signal.schema.field("topk_counts").type == pa.list_(pa.int16())
    by_id, all_counts, near_boundary = signals_by_id(signal, temperatures), [], 0
    for row in rows.slice(0, 6).to_pylist():
        log_probs = response_log_probs(teacher_engine, row).double()
        stored = by_id[row["example_id"]]
        counts = stored.counts.astype(int)
        all_counts.extend(counts)
        assert stored.ids.shape == (len(log_probs), counts.max())
        order = log_probs.argsort(-1, descending=True)
        covered = torch.softmax(log_probs / 2.0, -1).gather(-1, order).cumsum(-1)
        for token, count in enumerate(counts):
            # The engine sums in float32: within 1e-5 of the coverage either count is right.
            reached = covered[token, count - 1] >= coverage - 1e-5 or count == max_k
            short = count == 1 or covered[token, count - 2] < coverage + 1e-5
            assert reached and short, (token, count)
            near_boundary += abs(covered[token, count - 1].item() - coverage) < 1e-5
            np.testing.assert_array_equal(stored.ids[token, :count], order[token, :count].numpy())
            np.testing.assert_allclose(stored.logprobs[token, :count], log_probs[token, order[token, :count]],
                                       rtol=1e-5, atol=1e-6)  # fmt: skip
            assert (stored.ids[token, count:] == stored.ids[token, 0]).all()
            assert np.isneginf(stored.logprobs[token, count:]).all()
            kept_mass = log_probs[token, order[token, :count]].exp().sum().item()
            assert np.exp(stored.tail[token]) == pytest.approx(1 - kept_mass, abs=1e-5)
    assert near_boundary == 0 and 1 < np.mean(all_counts) < max_k and len(set(all_counts)) > 3
    mass, ids_per_token = tail_mass([signal], temperatures)
    assert ids_per_token == pytest.approx(np.mean(all_counts))
    assert mass["2"] <= 1 - coverage + 1e-4 and mass["1"] < mass["2"]


@pytest.mark.parametrize("name", KD_LOSS_NAMES)
def test_an_adaptive_signals_loss_is_each_tokens_fixed_k_loss(name):
    """Padding changes nothing: a token stored with c ids and padding has the loss (and student gradient)
    of the same token stored as a fixed top c, at T 1 and at a stored T 2."""
    torch.manual_seed(0)
    teacher_logits, student_logits = 2 * torch.randn(6, 20), torch.randn(6, 20)
    ids, logprobs, tail, tempered, counts = topk_of(teacher_logits, 20, (2.0,), coverage=0.8)
    assert len(set(counts.tolist())) > 1 and counts.max() < 20
    width = int(counts.max())
    adaptive = SparseTeacher(ids[:, :width].long(), logprobs[:, :width], tail, tempered, (2.0,))
    for temperature in (1.0, 2.0):
        student = student_logits.clone().requires_grad_()
        per_token = adaptive.kd(student, slice(None), LossSettings(name), temperature)
        per_token.sum().backward()
        for row, count in enumerate(counts.tolist()):
            alone = student_logits[row : row + 1].clone().requires_grad_()
            fixed = sparse_from_dense(teacher_logits[row : row + 1], count, (2.0,))
            expected = fixed.kd(alone, slice(None), LossSettings(name), temperature)
            expected.sum().backward()
            torch.testing.assert_close(per_token[row : row + 1], expected, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(student.grad[row : row + 1], alone.grad, rtol=1e-5, atol=1e-6)


def test_signal_checks_name_the_row(rows, teacher_engine):
    signal = score_signal(rows, teacher_engine, k=4, logprob_dtype="float16")
    tokenizer = teacher_engine.tokenizer
    check_signal(rows, signal, tokenizer, DATA)
    with pytest.raises(DataError, match=rf"no signal for 1 of 32 rows .*first: {rows['example_id'][0].as_py()}"):
        check_signal(rows, signal.slice(1), tokenizer, DATA)
    shorter = DataSpec(train=DataSourceSpec(path="unused"), max_response_tokens=8)
    with pytest.raises(DataError, match=r"teacher_signal for row \S+ covers \d+ response tokens, but the row "
                                        r"tokenizes to \d+"):  # fmt: skip
        check_signal(rows, signal, tokenizer, shorter)


def test_a_shard_made_with_another_k_or_teacher_is_refused_by_name(rows, teacher_engine, tmp_path):
    settings = {"teacher": {"path": "/models/a"}, "k": 8, "logprob_dtype": "float16"}
    made = ShardedPass("teacher_signal", Location.of(tmp_path), SETTINGS_KEY, settings)
    signal = score_signal(rows.slice(0, 3), teacher_engine, k=8, logprob_dtype="float16")
    made.write(0, signal, signal.schema)
    for changed, name in (({"k": 16}, "k"), ({"teacher": {"path": "/models/b"}}, "teacher"),
                          ({"tail_temperatures": [2.0]}, "tail_temperatures")):  # fmt: skip
        other = ShardedPass("teacher_signal", Location.of(tmp_path), SETTINGS_KEY, {**settings, **changed})
        with pytest.raises(RunDirError, match=rf"other teacher_signal settings \({name} differ\)"):
            other.check_existing(made.shard_path(0))


def test_training_on_a_full_signal_equals_online_training_and_loads_no_teacher(tmp_path, tiny_models, rows):
    """k = vocabulary in float32: the stored signal is the teacher's exact distribution, so per-step losses
    equal those of the online teacher (T 1, then T 2, whose stored tempered tail reaches the loss). The topk
    trainer holds no teacher model."""
    engine = TransformersEngine(ModelSpec(path=tiny_models["teacher"]), DATA, max_new_tokens=1)
    vocab = len(engine.tokenizer)
    signal = score_signal(rows, engine, k=vocab, logprob_dtype="float32", temperatures=(2.0,))
    train = rows.select(["example_id", "prompt", "response"])
    plan = (StagePlan(0, ("all",), StageSpec(steps=3, kd_weight=0.5, temperature=1.0, lr=1e-3)),
            StagePlan(1, ("all",), StageSpec(steps=3, kd_weight=1.0, temperature=2.0, lr=1e-3)))  # fmt: skip
    cpu = torch.device("cpu")
    online = make_job(tmp_path / "online", tiny_models, plan=plan)
    Trainer(online, LocalHost({"all": train}, tmp_path / "online" / "ck", cpu)).run()
    topk = make_job(tmp_path / "topk", tiny_models, plan=plan)
    topk = type(topk)(**{**topk.__dict__, "teacher_signal": "topk"})
    trainer = Trainer(topk, LocalHost({"all": train, SIGNAL_DATASET: signal}, tmp_path / "topk" / "ck", cpu))
    trainer.run()
    assert unwrap(trainer.model).teacher is None
    batch = trainer._pool(plan[1]).micro_batch((0, 1), engine.tokenizer.pad_token_id).teacher_topk
    assert batch.tail_temperatures == (2.0,) and batch.tempered_tails.shape == (len(batch.tail), 1)
    assert step_losses(tmp_path / "topk") == pytest.approx(step_losses(tmp_path / "online"), rel=1e-5)


def test_training_reads_an_adaptive_signal_padded_per_micro_batch(tmp_path, tiny_models, rows):
    """The worker reads an adaptive signal's ragged rows back and pads each micro-batch to its widest token;
    with a coverage that leaves each token only float32 rounding outside, the losses are the full signal's."""
    engine = TransformersEngine(ModelSpec(path=tiny_models["teacher"]), DATA, max_new_tokens=1)
    train = rows.select(["example_id", "prompt", "response"])
    plan = (StagePlan(0, ("all",), StageSpec(steps=2, kd_weight=0.5, temperature=2.0, lr=1e-3)),)

    def trained(name: str, signal: pa.Table) -> Trainer:
        job = make_job(tmp_path / name, tiny_models, plan=plan)
        job = type(job)(**{**job.__dict__, "teacher_signal": "topk"})
        host = LocalHost({"all": train, SIGNAL_DATASET: signal}, tmp_path / name / "ck", torch.device("cpu"))
        trainer = Trainer(job, host)
        trainer.run()
        return trainer

    adaptive = trained("adaptive", score_signal(rows, engine, 400, "float32", (2.0,), coverage=0.5))
    pool = adaptive._pool(plan[0])
    first, second = signals_by_id(pool.rows.signals.read(list(pool.ids((0, 1)))), (2.0,)).values()
    batch = pool.micro_batch((0, 1), engine.tokenizer.pad_token_id).teacher_topk
    assert batch.ids.shape == (len(first.tail) + len(second.tail), max(first.counts.max(), second.counts.max()))
    assert len(step_losses(tmp_path / "adaptive")) == 2
    assert all(np.isfinite(loss) for loss in step_losses(tmp_path / "adaptive").values())
    trained("everything", score_signal(rows, engine, 400, "float32", (2.0,), coverage=1 - 1e-9))
    trained("full", score_signal(rows, engine, 400, "float32", (2.0,)))
    assert step_losses(tmp_path / "everything") == pytest.approx(step_losses(tmp_path / "full"), rel=1e-6)


def test_the_teacher_pass_writes_whole_shards_when_ray_data_splits_them(tmp_path, ray_session, tiny_models, rows):
    """Review F1: Ray Data splits a map output larger than its block-size limit into several blocks (at k
    1024 a 512-row shard is 190-300 MB against 128 MiB). The writer collects a shard's pieces and writes it
    whole; here the limit is shrunk so that every 16-row shard of the tiny teacher's k 64 signal splits."""
    from srd_ray.spec import JobSpec
    from srd_ray.teacher_signal import read_signal, run_teacher_signal

    spec = JobSpec.model_validate({
        "run": {"name": "f1", "output_dir": str(tmp_path)},
        "models": {"teacher": {"path": tiny_models["teacher"]}, "student": {"path": tiny_models["student"]}},
        "data": {"train": {"path": "unused"}, "max_response_tokens": 32},
        "teacher_signal": {"k": 64, "shard_rows": 16, "engine": "transformers"},
    })  # fmt: skip
    context = ray_session.data.DataContext.get_current()
    limit = context.target_max_block_size
    context.target_max_block_size = 16 * 1024
    try:
        summary = run_teacher_signal(
            spec, rows, tmp_path / "signal", teacher=spec.models.teacher, engine="transformers"
        )
    finally:
        context.target_max_block_size = limit
    assert summary["shards"] == 2 and summary["rows"] == rows.num_rows
    bytes_per_shard = summary["raw_bytes_per_token"] * summary["response_tokens"] / 2
    assert bytes_per_shard > 4 * 16 * 1024, "each shard must exceed the block limit several times"
    signal = read_signal(tmp_path / "signal", ["example_id", "num_tokens"])
    assert sorted(signal["example_id"].to_pylist()) == sorted(rows["example_id"].to_pylist())


def test_an_adaptive_pass_reports_ids_per_token_and_its_settings(tmp_path, ray_session, tiny_models, rows):
    from srd_ray.spec import JobSpec
    from srd_ray.teacher_signal import read_signal, run_teacher_signal

    spec = JobSpec.model_validate({
        "run": {"name": "adaptive", "output_dir": str(tmp_path)},
        "models": {"teacher": {"path": tiny_models["teacher"]}, "student": {"path": tiny_models["student"]}},
        "data": {"train": {"path": "unused"}, "max_response_tokens": 32},
        "teacher_signal": {"k": "adaptive", "coverage": 0.5, "max_k": 300, "shard_rows": 16},
    })  # fmt: skip
    summary = run_teacher_signal(spec, rows, tmp_path / "signal", teacher=spec.models.teacher, engine="transformers")
    signal = read_signal(tmp_path / "signal", ["num_tokens", "topk_counts"])
    counts = signal["topk_counts"].combine_chunks().flatten().to_numpy()
    assert summary["ids_per_token"] == pytest.approx(counts.mean(), abs=0.01) and 1 < counts.mean() < 300
    temperatures = len(summary["tail_temperatures"])
    assert summary["raw_bytes_per_token"] == pytest.approx(counts.mean() * 6 + 4 * (1 + temperatures) + 2, abs=0.1)
    assert (summary["k"], summary["coverage"], summary["max_k"]) == ("adaptive", 0.5, 300)
    assert summary["tail_mass"]["1"] <= 0.5


def test_the_pass_scores_each_example_once_in_example_id_order():
    """A training row that is also a held-out row is scored once; rows come in example_id order (so the same
    rows always make the same shards), across the chunks of a concatenated table too."""
    training = pa.table({"example_id": ["b", "a", "d"], "prompt": ["pb", "pa", "pd"]})
    heldout = pa.table({"example_id": ["d", "c"], "prompt": ["pd", "pc"]})
    rows = unique_rows(pa.concat_tables([training, heldout]))
    assert rows["example_id"].to_pylist() == ["a", "b", "c", "d"]
    assert rows["prompt"].to_pylist() == ["pa", "pb", "pc", "pd"]
    assert unique_rows(training.slice(0, 0)).num_rows == 0
    assert unique_rows(rows) is rows, "rows already unique and in example_id order are not copied again"
