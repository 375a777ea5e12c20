"""Reflection core with a real tiny model loaded through from_pretrained (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from srd_ray.data import LoadedData, drop_long_prompts, load_source
from srd_ray.engines import NoRepeatNGram, TransformersEngine, check_context
from srd_ray.errors import DataError, ModelError, RunDirError
from srd_ray.models import check_model_path
from srd_ray.reflect import SETTINGS_KEY, score_table
from srd_ray.reflect_columns import INPUT_FIELDS, SIGNAL_FIELDS, add_rouge, shard_columns
from srd_ray.scoring import rouge_l
from srd_ray.shards import (
    PASS_COLUMNS,
    ShardedPass,
    ShardEngine,
    ShardWriter,
    check_rejected,
    follow_progress,
    score_isolating_rows,
    split_into_shards,
)
from srd_ray.spec import DataSourceSpec, DataSpec, GenerationSpec, ModelSpec
from srd_ray.storage import Location


def data_spec(path: str = "unused.jsonl", **limits) -> DataSpec:
    return DataSpec(train=DataSourceSpec(path=path, max_rows=10), **limits)


@pytest.fixture(scope="module")
def rows(demo_data) -> pa.Table:
    data = data_spec(demo_data["train"])
    return load_source(data.train, data, label="train").table


@pytest.fixture(scope="module")
def engine(tiny_models) -> TransformersEngine:
    data = data_spec(max_prompt_tokens=256, max_response_tokens=64)
    return TransformersEngine(ModelSpec(path=tiny_models["student"]), data, max_new_tokens=12, batch_size=4)


def test_score_table_adds_every_signal(engine, rows):
    scored = score_table(rows, engine, GenerationSpec(max_new_tokens=12))
    assert scored.num_rows == rows.num_rows
    assert scored["example_id"].to_pylist() == rows["example_id"].to_pylist()
    for answer, refs, score in zip(
        scored["student_answer"].to_pylist(),
        scored["references"].to_pylist(),
        scored["rouge_l"].to_pylist(),
        strict=True,
    ):
        assert score == pytest.approx(rouge_l(answer, refs))
    assert all(ce > 0 for ce in scored["student_ce"].to_pylist())
    assert all(1 <= n <= 12 for n in scored["generated_tokens"].to_pylist())
    assert scored["teacher_ce"].null_count == rows.num_rows  # not asked for
    assert not any(scored["prompt_truncated"].to_pylist())


def test_teacher_ce_is_scored_when_a_teacher_engine_is_given(engine, rows, tiny_models):
    data = data_spec(max_prompt_tokens=256, max_response_tokens=64)
    teacher = TransformersEngine(ModelSpec(path=tiny_models["teacher"]), data, max_new_tokens=12)
    scored = score_table(rows.slice(0, 3), engine, GenerationSpec(max_new_tokens=4), teacher)
    expected = teacher.response_cross_entropy(rows["prompt"].to_pylist()[:3], rows["response"].to_pylist()[:3])
    assert scored["teacher_ce"].to_pylist() == pytest.approx(expected.mean)
    assert scored["teacher_ce"].to_pylist() != pytest.approx(scored["student_ce"].to_pylist())


def test_student_ce_is_mean_response_token_cross_entropy(engine, tiny_models, rows):
    """Recompute the teacher-forced CE by hand for one row: prompt and response tokenized separately."""
    path = tiny_models["student"]
    prompt, response = rows["prompt"][0].as_py(), rows["response"][0].as_py()
    result = engine.response_cross_entropy([prompt], [response])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + response_ids])).logits[0]
    log_probs = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    expected = -log_probs[torch.arange(len(response_ids)), torch.tensor(response_ids)].mean().item()
    assert result.tokens == [len(response_ids)]
    assert result.mean[0] == pytest.approx(expected, rel=1e-4)
    # Batching with other rows (padding, length sorting) must not change a row's CE.
    batched = engine.response_cross_entropy([rows["prompt"][1].as_py(), prompt, "x"], ["y z", response, "x"])
    assert batched.mean[1] == pytest.approx(result.mean[0], rel=1e-4)


def test_answers_do_not_depend_on_batch_neighbours_under_greedy(engine, rows):
    prompts = rows["prompt"].to_pylist()
    greedy = GenerationSpec(temperature=0, max_new_tokens=10)
    alone = [engine.generate([p], greedy, [0]).texts[0] for p in prompts[:4]]
    assert engine.generate(prompts[:4], greedy, [0] * 4).texts == alone


@pytest.mark.parametrize("size", [1, 2, 3, 6])
def test_vectorised_no_repeat_ngram_matches_transformers(size):
    """Our vectorised ban equals transformers' own processor, padding tokens included."""
    generator = torch.Generator().manual_seed(size)
    input_ids = torch.randint(0, 5, (6, 40), generator=generator)  # small vocab: many repeats
    input_ids[0, :7] = 0  # a left-padded row
    input_ids[1] = torch.tensor([0, 1, 2, 3, 4, 0, 1] * 6)[:40]  # a periodic row: long n-grams repeat
    scores = torch.randn(6, 5, generator=generator)
    ours = NoRepeatNGram(size)(input_ids, scores.clone())
    reference = NoRepeatNGramLogitsProcessor(size)(input_ids, scores.clone())
    assert torch.equal(ours, reference)
    assert torch.isinf(ours).any()


def test_vllm_ngram_ban_matches_transformers_step_by_step():
    pytest.importorskip("vllm")
    from srd_ray.vllm_processors import NGramBan

    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 6, (30,), generator=generator).tolist()
    output: list[int] = []
    ban = NGramBan(3)
    for _ in range(40):  # the output list grows in place between calls, as in vLLM
        scores = torch.randn(6, generator=generator)
        reference = NoRepeatNGramLogitsProcessor(3)(torch.tensor([prompt + output]), scores.clone()[None])[0]
        ours = ban(prompt, output, scores.clone())
        assert torch.equal(ours, reference)
        allowed = torch.nonzero(~torch.isinf(ours)).flatten()
        output.append(int(allowed[0]) if len(allowed) else 0)


def test_the_vllm_ngram_ban_masks_a_whole_batch_at_once_as_each_request_would():
    """Review F18: the processor's batched write bans, per row, exactly what each request's own ban does (and
    leaves rows whose requests did not ask for it alone)."""
    pytest.importorskip("vllm")
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    from srd_ray.vllm_processors import NGramBan, NoRepeatNGramProcessor

    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 5, (20,), generator=generator).tolist() for _ in range(3)]
    outputs: list[list[int]] = [[], [], []]
    asks = [SamplingParams(extra_args={"no_repeat_ngram_size": 3}), SamplingParams(),
            SamplingParams(extra_args={"no_repeat_ngram_size": 2})]  # fmt: skip
    processor = NoRepeatNGramProcessor(None, torch.device("cpu"), False)
    added = [(row, asks[row], prompts[row], outputs[row]) for row in range(3)]
    processor.update_state(BatchUpdate(batch_size=3, removed=[], added=added, moved=[]))
    singles = [NGramBan(3), None, NGramBan(2)]
    for _ in range(25):
        scores = torch.randn(3, 5, generator=generator)
        batched = processor.apply(scores.clone())
        for row, ban in enumerate(singles):
            expected = scores[row] if ban is None else ban(prompts[row], outputs[row], scores[row].clone())
            assert torch.equal(batched[row], expected), row
            allowed = torch.nonzero(~torch.isinf(batched[row])).flatten()
            outputs[row].append(int(allowed[0]) if len(allowed) else 0)  # grows in place, as in vLLM
        processor.update_state(None)


def test_long_prompts_are_left_truncated_and_flagged(tiny_models):
    data = data_spec(max_prompt_tokens=8, max_response_tokens=8)
    engine = TransformersEngine(ModelSpec(path=tiny_models["student"]), data, max_new_tokens=3)
    answers = engine.generate(["word " * 50, "hi"], GenerationSpec(max_new_tokens=3), seeds=[1, 2])
    assert answers.prompt_truncated == [True, False] and len(answers.texts) == 2


def test_long_prompts_are_bad_rows_when_truncation_is_off(rows):
    def count_words(prompts: list[str]) -> list[int]:
        return [len(p.split()) for p in prompts]

    limit = sorted(count_words(rows["prompt"].to_pylist()))[5]
    loaded = LoadedData(rows)
    strict = data_spec(max_prompt_tokens=limit, truncate_long_prompts=False)
    with pytest.raises(DataError, match=r"example_id .* prompt has \d+ tokens, over data.max_prompt_tokens"):
        drop_long_prompts(loaded, strict, count_words)
    skipping = data_spec(max_prompt_tokens=limit, truncate_long_prompts=False, on_bad_row="skip")
    kept = drop_long_prompts(loaded, skipping, count_words)
    assert kept.table.num_rows + len(kept.skipped) == rows.num_rows
    assert all(n <= limit for n in count_words(kept.table["prompt"].to_pylist()))
    assert all("input position" in s["where"] for s in kept.skipped)


def test_context_longer_than_the_model_is_an_error_before_loading(tiny_models):
    too_long = data_spec(max_prompt_tokens=800, max_response_tokens=200)  # tiny models have 1024 positions
    with pytest.raises(ModelError, match=r"context of 1024 positions.*max_prompt_tokens \(800\)"):
        check_context(ModelSpec(path=tiny_models["student"]), too_long, max_new_tokens=256)


def test_shards_follow_input_position(rows):
    shuffled = rows.take([3, 1, 0, 2, 4, 5, 9, 8, 7, 6])
    shards = split_into_shards(shuffled, 4)
    assert [s.num_rows for s in shards] == [4, 4, 2]
    assert shards[0]["input_position"].to_pylist() == [0, 1, 2, 3]
    assert shards[2]["shard_index"].to_pylist() == [2, 2]
    # Rows already in input order (as loaded) are sliced, not copied: the driver holds one copy of the data.
    in_order = split_into_shards(rows, 4)
    assert in_order[1]["prompt"].chunks[0].buffers()[2].address == rows["prompt"].chunks[0].buffers()[2].address


def test_shard_schema_is_explicit_and_carries_settings(engine, rows, tmp_path):
    scored = score_table(rows.slice(0, 2), engine, GenerationSpec(max_new_tokens=3))
    settings = {"engine": "transformers", "generation": {"temperature": 0.01}}
    sharded = ShardedPass("reflect", Location.of(tmp_path), SETTINGS_KEY, settings)
    columns = shard_columns(scored)
    assert columns.names[: len(INPUT_FIELDS) + len(SIGNAL_FIELDS)] == [f.name for f in INPUT_FIELDS + SIGNAL_FIELDS]
    assert "difficulty" in columns.names  # the demo data's label is passed through
    sharded.write(0, scored, columns)
    path = sharded.shard_path(0)
    assert json.loads(pq.read_schema(path.path).metadata[SETTINGS_KEY]) == settings
    sharded.check_existing(path)
    other = ShardedPass("reflect", Location.of(tmp_path), SETTINGS_KEY, {**settings, "engine": "vllm"})
    with pytest.raises(RunDirError, match=r"other reflect settings \(engine differ\).*--redo reflect"):
        other.check_existing(path)
    Path(path.path).write_bytes(Path(path.path).read_bytes()[:50])
    with pytest.raises(DataError, match="unreadable reflect shard"):
        sharded.check_existing(path)


def test_reflect_shards_are_one_row_group_and_read_back_as_one_chunk(rows, tmp_path):
    """Whole-shard readers (rank, refresh, the teacher pass's counts) hold one chunk per column, not one
    per 16-row group (bench/results/shard_row_groups.md). Only teacher-signal shards keep small row groups
    (training reads them a group at a time)."""
    from srd_ray.shards import ROW_GROUP_ROWS
    from srd_ray.teacher_signal import signal_pass

    table = pa.concat_tables([rows.slice(i % rows.num_rows, 1) for i in range(40)])  # as batches arrive: many chunks
    table = table.set_column(
        table.schema.get_field_index("input_position"),
        "input_position",
        pa.chunked_array([[i] for i in range(40)], pa.int64()),
    )
    assert table.num_rows > ROW_GROUP_ROWS and table["prompt"].num_chunks == table.num_rows
    sharded = ShardedPass("reflect", Location.of(tmp_path / "reflect"), SETTINGS_KEY, {})
    sharded.write(0, table, table.schema)
    assert pq.ParquetFile(sharded.shard_path(0).path).num_row_groups == 1
    read = sharded.read()
    assert read.to_pylist() == table.to_pylist() and {read[name].num_chunks for name in read.column_names} == {1}
    signal = signal_pass(tmp_path / "teacher_signal", {})
    signal.write(0, table, table.schema)
    assert pq.ParquetFile(signal.shard_path(0).path).num_row_groups == -(-table.num_rows // ROW_GROUP_ROWS)
    assert {signal.read()[name].num_chunks for name in read.column_names} == {1}


def test_scored_rows_take_the_datas_columns_from_the_training_rows(rows, tmp_path):
    """The rank stage reads only what reflect added from the shards; the data's columns are the training
    rows' own arrays (no second copy of the text), and the table equals the shards read whole, metadata and
    all, whatever the data's row order; a scored row the data lacks is named."""
    from srd_ray.reflect import read_scored

    data, n = rows.slice(0, 10), 10
    answers = {"student_answer": [f"answer {i}" for i in range(n)], "rouge_l": [i / n for i in range(n)],
               "student_ce": [float(i) for i in range(n)], "teacher_ce": [None] * n, "response_tokens": [3] * n,
               "generated_tokens": [4] * n, "prompt_truncated": [False] * n}  # fmt: skip
    scored = data
    for name, values in answers.items():
        scored = scored.append_column(name, pa.array(values, next(f.type for f in SIGNAL_FIELDS if f.name == name)))
    sharded = ShardedPass("reflect", Location.of(tmp_path / "reflect" / "shards"), SETTINGS_KEY, {"engine": "x"})
    sharded.write(0, scored.slice(0, 7), shard_columns(scored))
    sharded.write(1, scored.slice(7), shard_columns(scored))
    whole = read_scored(tmp_path / "reflect")
    with_data = read_scored(tmp_path / "reflect", data)
    assert with_data.equals(whole, check_metadata=True)
    assert with_data["prompt"].chunks[0].buffers()[2].address == data["prompt"].chunks[0].buffers()[2].address
    shuffled = data.take([5, 3, 9, 0, 1, 2, 4, 6, 7, 8])
    assert read_scored(tmp_path / "reflect", shuffled).equals(whole, check_metadata=True)
    with pytest.raises(
        DataError, match=r"the reflect shards: example_id .* is not in the training data; rerun with --redo reflect"
    ):
        read_scored(tmp_path / "reflect", data.slice(1))


def test_completeness_check_catches_lost_and_duplicated_rows(rows, tmp_path):
    sharded = ShardedPass("reflect", Location.of(tmp_path), SETTINGS_KEY, {})
    ids = rows["example_id"].to_pylist()
    sharded.check_complete(ids, rows)
    with pytest.raises(DataError, match="1 missing"):
        sharded.check_complete(ids, rows.slice(1))
    with pytest.raises(DataError, match="1 duplicated"):
        sharded.check_complete(ids, pa.concat_tables([rows, rows.slice(0, 1)]))
    with pytest.raises(DataError, match="1 not in the input"):
        sharded.check_complete(ids[1:], rows)


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        check_model_path(ModelSpec(path=str(tmp_path / "nope")), "student")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"no \*\.safetensors weights"):
        check_model_path(ModelSpec(path=str(tmp_path)), "teacher")


def test_rows_the_engine_rejects_are_set_aside_not_the_shard(rows, tmp_path):
    """One rejected row costs that row (recorded with its reason in the shard), not the shard; an engine
    failure that is not a row's still fails; under on_bad_row: error the rejection names the row."""
    bad = set(rows["example_id"].to_pylist()[3:5])
    calls = []

    def score(batch: pa.Table) -> pa.Table:
        calls.append(batch.num_rows)
        if bad & set(batch["example_id"].to_pylist()):
            raise ValueError("prompt too long for the context")
        return batch

    scored, rejected = score_isolating_rows(rows, score, (ValueError,))
    assert scored.num_rows == rows.num_rows - 2 and {r["example_id"] for r in rejected} == bad
    assert all("ValueError: prompt too long" in r["reason"] for r in rejected)
    assert len(calls) < 2 * rows.num_rows, "bisection, not one call per row"
    with pytest.raises(RuntimeError):
        score_isolating_rows(rows, lambda batch: (_ for _ in ()).throw(RuntimeError("engine died")), (ValueError,))
    with pytest.raises(
        DataError, match=r"reflect: the engine rejects row \S+ \(ValueError: prompt too long.*and 1 more"
    ):
        check_rejected("reflect", rejected, "error")
    check_rejected("reflect", rejected, "skip")

    sharded = ShardedPass("reflect", Location.of(tmp_path), SETTINGS_KEY, {"engine": "x"})
    sharded.write(0, scored, scored.schema, rejected)
    sharded.write(1, None, scored.schema, [{"example_id": "all-rejected", "reason": "ValueError: x"}])
    assert {r["example_id"] for r in sharded.rejected()} == bad | {"all-rejected"}
    sharded.check_complete([*rows["example_id"].to_pylist(), "all-rejected"], sharded.read())


def test_engine_and_writer_stages_write_whole_shards_with_rejected_rows(rows, tmp_path):
    """The pass's two stages without Ray: the engine side scores shards and marks rejected rows, the
    writer side finishes (ROUGE-L here), writes each shard whole and reports it. A shard that arrives in
    pieces (Ray Data splits blocks over its size limit: review F1) is written once all its rows are in."""
    shards = split_into_shards(rows.slice(0, 10), 4)
    bad = rows["example_id"][5].as_py()

    def score(batch: pa.Table) -> pa.Table:
        if bad in batch["example_id"].to_pylist():
            raise ValueError("rejected by the engine")
        answered = batch.append_column("student_answer", batch["response"])
        return answered.append_column("generated_tokens", pa.array([2] * batch.num_rows))

    engine = ShardEngine("reflect", score, (ValueError,), "skip")
    sharded = ShardedPass("reflect", Location.of(tmp_path), SETTINGS_KEY, {"engine": "x"})
    sizes = {shard["shard_index"][0].as_py(): shard.num_rows for shard in shards}
    writer = ShardWriter(sharded, add_rouge, lambda table: table.schema, "generated_tokens", shard_sizes=sizes)
    summaries = [writer(engine(shard)).to_pylist()[0] for shard in shards]
    assert [s["rows"] for s in summaries] == [4, 4, 2] and [s["tokens"] for s in summaries] == [8, 6, 4]
    assert [r["example_id"] for r in sharded.rejected()] == [bad]
    written = sharded.read()
    assert written.num_rows == 9 and written["rouge_l"].to_pylist() == [1.0] * 9  # answer == reference
    # Shards in input order are read as they are (one chunk each), not sorted into a copy.
    assert written["input_position"].to_pylist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert written["example_id"].num_chunks == 3
    assert not set(written.column_names) & set(PASS_COLUMNS)

    pieces = ShardedPass("reflect", Location.of(tmp_path / "pieces"), SETTINGS_KEY, {"engine": "x"})
    collecting = ShardWriter(pieces, add_rouge, lambda table: table.schema, "generated_tokens", shard_sizes=sizes)
    scored = engine(shards[1])
    assert collecting(scored.slice(0, 3)).num_rows == 0 and not pieces.shard_path(1).exists()
    (summary,) = collecting(scored.slice(3)).to_pylist()
    assert summary["rows"] == 4 and pieces.read().num_rows == 3 and len(pieces.rejected()) == 1
    with pytest.raises(RuntimeError, match="shard 0 got 8 of 4 rows"):
        collecting(pa.concat_tables([engine(shards[0])] * 2))


def test_progress_counts_a_shard_once_when_its_writer_call_is_retried():
    """Review C4: Ray retries a writer call that crashed after writing; the file is written once (atomic,
    by name) and the progress totals count it once too."""
    summaries = [{"shard_index": i, "rows": 4, "tokens": 10, "seconds": 1.0} for i in (0, 1, 1, 2)]
    assert follow_progress("reflect", summaries, total_rows=12, tokens_label="tokens") == {
        "rows": 12, "tokens": 30, "busy_s": 3.0,
    }  # fmt: skip


def test_a_vllm_student_beside_the_teacher_gets_the_memory_the_teacher_leaves():
    """Review F7: with reflect.teacher_ce the transformers teacher loads first on the actor's GPU; vLLM's
    gpu_memory_utilization is a fraction of the whole GPU, so it is capped at what is left."""
    from srd_ray.reflect import memory_fraction_beside

    gib = 2**30
    assert memory_fraction_beside(0.9, free_bytes=80 * gib, total_bytes=80 * gib) == 0.9
    assert memory_fraction_beside(0.9, free_bytes=65 * gib, total_bytes=80 * gib) == pytest.approx(64 / 80)
    with pytest.raises(ModelError, match=r"leaves 2\.0 of 80\.0 GiB free"):
        memory_fraction_beside(0.9, free_bytes=2 * gib, total_bytes=80 * gib)
