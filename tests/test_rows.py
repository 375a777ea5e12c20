"""Training rows read as training needs them (``srd_ray.distill.rows``, ``pool``): the layout, reads by
example_id through a bounded cache, and a worker whose resident rows and signal do not grow with the data."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from srd_ray import storage
from srd_ray.distill.rows import SCAN_ROWS, RowFile, write_rows
from srd_ray.distill.worker import SIGNAL_DATASET, LocalHost, StagePlan, Trainer
from srd_ray.engines import TransformersEngine
from srd_ray.errors import DataError
from srd_ray.shards import ROW_GROUP_ROWS
from srd_ray.spec import DataSourceSpec, DataSpec, ModelSpec, StageSpec
from srd_ray.teacher_signal import score_signal
from tests.test_trainer import make_job

CPU = torch.device("cpu")


def rows_table(n: int) -> pa.Table:
    return pa.table({"example_id": [f"row-{i:04d}" for i in range(n)][::-1], "prompt": [f"p{i}" for i in range(n)],
                     "response": [f"r{i}" for i in range(n)], "extra": list(range(n))})  # fmt: skip


def test_rows_are_written_sorted_and_read_by_id_from_a_node_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("SRD_CACHE_DIR", str(tmp_path / "cache"))
    write_rows(rows_table(50), tmp_path / "part.parquet")
    parquet = pq.ParquetFile(tmp_path / "part.parquet")
    assert parquet.schema_arrow.names == ["example_id", "prompt", "response"]
    assert [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)] == [16, 16, 16, 2]
    rows = RowFile([tmp_path / "part.parquet"])
    assert rows.ids() == sorted(f"row-{i:04d}" for i in range(50)) and len(rows) == 50
    wanted = ["row-0049", "row-0000", "row-0020", "row-0049"]
    assert rows.read(wanted)["example_id"].to_pylist() == wanted  # in the order asked, repeats kept
    assert rows.read(["row-0021"], ["prompt"])["prompt"].to_pylist() == ["p28"]  # ids were written in reverse
    assert rows.peak_rows == 4, "a read holds the rows asked for, nothing more"
    assert RowFile([tmp_path / "part.parquet"]).node_folder == rows.node_folder, "one copy per node"
    with pytest.raises(DataError, match="row nope is in none"):
        rows.read(["row-0001", "nope"])


def test_a_node_copy_of_several_files_keeps_their_rows_and_refuses_a_repeated_id(tmp_path, monkeypatch):
    monkeypatch.setenv("SRD_CACHE_DIR", str(tmp_path / "cache"))
    table = rows_table(40)
    storage.write_parquet(tmp_path / "a" / "0.parquet", table.slice(0, 25), row_group_size=ROW_GROUP_ROWS)
    storage.write_parquet(tmp_path / "a" / "1.parquet", table.slice(25), row_group_size=ROW_GROUP_ROWS)
    rows = RowFile(sorted((tmp_path / "a").glob("*.parquet")))
    assert rows.read(["row-0000", "row-0039"])["extra"].to_pylist() == [39, 0]
    assert [t.num_rows for t in rows.scan(["example_id"], rows=16)] == [16, 16, 8]
    storage.write_parquet(tmp_path / "b" / "0.parquet", table.slice(0, 3))
    storage.write_parquet(tmp_path / "b" / "1.parquet", table.slice(2, 3))
    with pytest.raises(DataError, match="row-0037 appears more than once"):
        RowFile(sorted((tmp_path / "b").glob("*.parquet")))


def signal_rows(tiny_models, rows: pa.Table) -> pa.Table:
    data = DataSpec(train=DataSourceSpec(path="unused"), max_response_tokens=32)
    engine = TransformersEngine(ModelSpec(path=tiny_models["teacher"]), data, max_new_tokens=1)
    positioned = rows.append_column("input_position", pa.array(range(rows.num_rows), pa.int64()))
    return score_signal(positioned, engine, k=8, logprob_dtype="float16", temperatures=(2.0,))


def test_a_worker_holds_the_rows_of_its_batches_not_the_data_set(tmp_path, tiny_models, demo_data):
    """#29: with a top-k signal, 160 rows instead of 64 change neither the rows nor the signal bytes a worker
    holds at once: a read holds one micro-batch's rows (batch 1 here), or the rows of one step of the scan
    that learns the rows' lengths, whatever the data's size."""
    from srd_ray.data import load_source

    data = DataSpec(train=DataSourceSpec(path=demo_data["train"]), max_response_tokens=32)
    table = load_source(data.train, data, label="train").table.select(["example_id", "prompt", "response"])
    peaks = {}
    for size in (64, 160):
        rows = table.slice(0, size)
        plan = (StagePlan(0, ("all",), StageSpec(steps=12, kd_weight=1.0, temperature=2.0, lr=1e-3)),)
        job = make_job(tmp_path / str(size), tiny_models, plan=plan, batch_size=1, gradient_accumulation_steps=1)
        job = type(job)(**{**job.__dict__, "teacher_signal": "topk"})
        host = LocalHost({"all": rows, SIGNAL_DATASET: signal_rows(tiny_models, rows)}, tmp_path / f"ck{size}", CPU)
        trainer = Trainer(job, host)
        trainer.run()
        peaks[size] = trainer.rows.peak_held()
    assert peaks[64]["rows"] <= SCAN_ROWS and peaks[160]["rows"] <= SCAN_ROWS, peaks
    assert peaks[160]["bytes"] <= 1.2 * peaks[64]["bytes"], peaks


def test_the_plan_and_losses_do_not_depend_on_reading_rows_lazily(tmp_path, tiny_models, demo_data):
    """The same rows in another input order give the same per-step losses (the pool is sorted by id)."""
    from srd_ray.data import load_source
    from tests.test_trainer import step_losses

    data = DataSpec(train=DataSourceSpec(path=demo_data["train"], max_rows=32), max_response_tokens=32)
    rows = load_source(data.train, data, label="train").table.select(["example_id", "prompt", "response"])
    plan = (StagePlan(0, ("all",), StageSpec(steps=4, kd_weight=0.5, temperature=1.0, lr=1e-3)),)
    for name, table in (("sorted", rows), ("reversed", rows.take(list(range(rows.num_rows))[::-1]))):
        job = make_job(tmp_path / name, tiny_models, plan=plan)
        Trainer(job, LocalHost({"all": table}, tmp_path / name / "ck", CPU)).run()
    assert step_losses(tmp_path / "sorted") == step_losses(tmp_path / "reversed")
