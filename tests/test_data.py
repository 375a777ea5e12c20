"""Data loading: formats, stable example ids, and errors that name file and line."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from srd_ray.data import example_id_for, load_source
from srd_ray.errors import DataError
from srd_ray.spec import MINILLM_TEMPLATE_NO_INPUT, DataSourceSpec, DataSpec, FieldMapping

from .conftest import shared_eval_file


def load(path, **kwargs):
    source_fields = kwargs.pop("fields", {})
    data = DataSpec(train=DataSourceSpec(path=str(path), fields=FieldMapping(**source_fields)), **kwargs)
    return load_source(data.train, data, label="data.train")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_minillm_dolly_format_from_shared_data():
    loaded = load(shared_eval_file("dolly.jsonl"))
    table = loaded.table
    assert table.num_rows == 500
    assert table["prompt"][0].as_py().endswith("### Response:\n")
    assert table["references"][0].as_py() == [table["response"][0].as_py()]
    assert "topic" in table.column_names  # passthrough columns survive
    assert table["input_position"].to_pylist() == list(range(500))


def test_list_references_in_sinst():
    table = load(shared_eval_file("sinst.jsonl"), max_response_tokens=256).table
    assert table.num_rows == 1694
    assert all(isinstance(refs, list) and refs for refs in table["references"].to_pylist()[:50])


def test_example_ids_are_stable_across_loads_and_formats(tmp_path):
    rows = [{"prompt": f"question {i}\n### Response:\n", "output": f"answer {i}"} for i in range(5)]
    first = load(write_jsonl(tmp_path / "a.jsonl", rows)).table
    second = load(write_jsonl(tmp_path / "b.jsonl", rows)).table
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    third = load(tmp_path / "c.parquet").table
    assert first["example_id"].to_pylist() == second["example_id"].to_pylist() == third["example_id"].to_pylist()
    assert first["example_id"][0].as_py() == example_id_for(rows[0]["prompt"], [rows[0]["output"]])
    assert len(set(first["example_id"].to_pylist())) == 5


def test_id_column_and_plain_instruction_context_response(tmp_path):
    rows = [
        {"uid": 7, "instruction": "Name a colour.", "context": "", "response": "Blue."},
        {"uid": 8, "instruction": "Summarise.", "context": "A long text.", "response": "Short."},
    ]
    table = load(write_jsonl(tmp_path / "dolly15k.jsonl", rows), fields={"id": "uid"}).table
    assert table["example_id"].to_pylist() == ["7", "8"]
    assert table["prompt"][0].as_py() == MINILLM_TEMPLATE_NO_INPUT.format(instruction="Name a colour.")
    assert "### Input:\nA long text." in table["prompt"][1].as_py()


def test_glob_reads_files_in_sorted_order(tmp_path):
    write_jsonl(tmp_path / "part-1.jsonl", [{"prompt": "b", "output": "2"}])
    write_jsonl(tmp_path / "part-0.jsonl", [{"prompt": "a", "output": "1"}])
    table = load(tmp_path / "part-*.jsonl").table
    assert table["prompt"].to_pylist() == ["a", "b"]
    assert table["input_position"].to_pylist() == [0, 1]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"prompt": "p", "output": "o"}\n{"prompt": "q", "output": ""}\n', "bad.jsonl:2: column 'output' is empty"),
        (b'{"prompt": "p", "output": "o"}\n{"prompt": 3, "output": "x"}\n', "bad.jsonl:2: column 'prompt' is a int"),
        (b'{"prompt": "p", "output": "o"}\n{"prompt": "\xff\xfe", "output": "x"}\n', "bad.jsonl:2: not UTF-8"),
        (b'{"prompt": "p", "output": "o"}\n{"prompt": "p", "output": "o"}\n', "bad.jsonl:2: duplicate example_id"),
        (b'{"prompt": "p", "output": "o"}\n{not json}\n', "bad.jsonl:2: invalid JSON"),
        (b'{"prompt": "p", "answer": "o"}\n', "bad.jsonl:1: no response column"),
        (b'{"prompt": "p", "output": []}\n', "bad.jsonl:1: column 'output' is an empty list"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load(path)
    assert expected in str(caught.value)


def test_missing_named_column_and_missing_file(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "output": "o"}])
    with pytest.raises(DataError, match=r"column 'answer' \(data.fields.response\) is missing"):
        load(path, fields={"response": "answer"})
    with pytest.raises(DataError, match="does not exist"):
        load(tmp_path / "nope.jsonl")


def test_truncated_parquet_is_a_clear_error(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "output": "o"}] * 50), tmp_path / "t.parquet")
    data = (tmp_path / "t.parquet").read_bytes()
    (tmp_path / "t.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"t\.parquet: not a readable Parquet file"):
        load(tmp_path / "t.parquet")


def test_skip_mode_counts_and_lists_bad_rows(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        b'{"prompt": "p", "output": "o"}\n{"prompt": "q", "output": " "}\n{"prompt": "r", "output": "x"}\n'
    )
    loaded = load(path, on_bad_row="skip")
    assert loaded.table["prompt"].to_pylist() == ["p", "r"]
    assert loaded.table["input_position"].to_pylist() == [0, 2]  # source positions, not renumbered
    assert loaded.skipped == [{"where": f"{path}:2", "reason": "column 'output' is empty"}]


def test_a_hub_dataset_reads_the_named_files_of_its_repository(tmp_path, monkeypatch):
    """Review F8: MiniLLM/dolly holds raw.jsonl, raw.txt, valid.jsonl and valid.txt; the recipes name the
    training file (``data_files``). A local folder laid out like that repository stands in for the hub."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "dolly"
    repo.mkdir()
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(3)]
    (repo / "raw.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (repo / "raw.txt").write_text("plain text the loader must not read\n")
    (repo / "valid.jsonl").write_text(json.dumps(rows[0]) + "\n")
    source = {"path": str(repo), "format": "hub", "data_files": "raw.jsonl", "split": "train"}
    data = DataSpec(train=DataSourceSpec(**source))
    table = load_source(data.train, data, label="data.train").table
    assert table["response"].to_pylist() == ["0", "1", "2"]
    assert table["prompt"][0].as_py().endswith("### Instruction:\nSay 0.\n\n### Response:\n")


CHAT_ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Of Spain?"},
                  {"role": "assistant", "content": "Madrid."}], "topic": "geo"},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "topic": "math"},
]  # fmt: skip


def test_chat_rows_from_jsonl_and_parquet_keep_their_messages(tmp_path):
    """#30: a `messages` column makes chat rows: the last assistant turn is the response, the turns before it
    a readable prompt, the messages kept as JSON for the models' chat templates; JSONL and Parquet alike."""
    loaded = load(write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS)).table
    assert loaded["response"].to_pylist() == ["Madrid.", "4"] and loaded["references"][1].as_py() == ["4"]
    assert loaded["prompt"][1].as_py() == "user: 2+2?"
    assert json.loads(loaded["messages"][0].as_py()) == CHAT_ROWS[0]["messages"]
    assert loaded["topic"].to_pylist() == ["geo", "math"]
    pq.write_table(pa.Table.from_pylist(CHAT_ROWS), tmp_path / "chat.parquet")  # list<struct> messages
    from_parquet = load(tmp_path / "chat.parquet").table
    assert from_parquet["messages"].to_pylist() == loaded["messages"].to_pylist()
    assert from_parquet["example_id"].to_pylist() == loaded["example_id"].to_pylist(), "ids from content"
    as_text = [{"conversation": json.dumps(row["messages"])} for row in CHAT_ROWS]
    named = load(write_jsonl(tmp_path / "text.jsonl", as_text), fields={"messages": "conversation"}).table
    assert named["messages"].to_pylist() == loaded["messages"].to_pylist()


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([{"role": "user", "content": "q"}], "last message must be the assistant's"),
        ([{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}], "role 'robot'"),
        ([{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}], "message 0 (user) has empty"),
        ([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}], "where 'user' was due"),
    ],
)
def test_bad_chat_rows_follow_on_bad_row_and_are_named(tmp_path, messages, reason):
    path = write_jsonl(tmp_path / "chat.jsonl", [*CHAT_ROWS, {"messages": messages}])
    with pytest.raises(DataError, match=f"chat.jsonl:3: column 'messages': .*{re.escape(reason)}"):
        load(path)
    skipped = load(path, on_bad_row="skip")
    assert skipped.table.num_rows == 2 and reason in skipped.skipped[0]["reason"]


def test_a_named_messages_column_that_is_missing_is_named(tmp_path):
    with pytest.raises(DataError, match=r"column 'conversation' \(data.fields.messages\) is missing"):
        load(write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS), fields={"messages": "conversation"})


def test_loading_in_chunks_gives_the_table_one_chunk_gives(tmp_path, monkeypatch):
    """#29: rows become Arrow a chunk at a time; passthrough columns are typed over all chunks: a column
    whose values disagree in another chunk is dropped, integers with floats are floats, and a column that
    is missing or empty in one chunk is null there."""
    import srd_ray.data as data_module

    rows = []
    for i in range(10):
        row = {
            "prompt": f"q{i}",
            "output": f"a{i}",
            "level": i,
            "label": "x" if i < 6 else i,
            "score": i if i < 3 else i / 2,
        }
        if i >= 4:
            row["late"] = f"t{i}"
        row["sparse"] = None if i < 3 else True
        rows.append(row)
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    whole = load(path)
    monkeypatch.setattr(data_module, "CHUNK_ROWS", 3)
    chunked = load(path)
    assert chunked.table.equals(whole.table), (chunked.table.schema, whole.table.schema)
    assert chunked.dropped_columns == whole.dropped_columns == {"label": "values of mixed types"}
    assert chunked.table.column_names == ["example_id", "input_position", "prompt", "references", "response",
                                          "late", "level", "score", "sparse"]  # fmt: skip
    assert chunked.table["late"].to_pylist()[:5] == [None] * 4 + ["t4"]
    assert pa.types.is_floating(chunked.table["score"].type) and chunked.table["input_position"].to_pylist() == list(
        range(10)
    )
