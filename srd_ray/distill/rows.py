"""The rows a training job trains on, read as it trains: a worker holds the rows and teacher signal of the
micro-batch it is building, not the data set.

Layout. Before training, the driver writes each dataset a job trains on (a rank bucket, all rows) as one
Parquet file, ``<stage dir>/rows/<name>/part-00000.parquet`` (``example_id``, ``prompt``, ``response``,
sorted by example_id); the teacher pass's signal shards are Parquet too. Parquet is how they are kept, not
how they are read: on each node, the first worker that needs a dataset copies its Parquet files into one
Arrow IPC file with **one record batch per row** (``$SRD_CACHE_DIR/rows/``, built once per node under a
lock, streamed a row group at a time), plus the row's example_ids in file order. A worker then keeps only a
sorted array of the ids (bytes, a few tens of bytes a row) and reads each micro-batch's rows by their
record-batch numbers: a read is a ``pread`` of those rows' bytes, with nothing to decode, so the signal
stays in its stored dtypes (int32 ids, float16 log-probs) until a micro-batch's tensors are made.

Why. The step plan is a seeded permutation per epoch that every worker computes alike (exact resume, the
same steps on 1 worker or 8), so a worker needs random access by row. Ray Data's streaming split hands rows
in an order of its own, and objects in Ray's object store are mapped whole into every reader: a worker
touching every row once an epoch would end up resident on the whole data set. Parquet row groups can be
read by range, but a top-k signal's list columns cost ~0.8 ms to decode per 16-row group, and a
micro-batch's rows lie in as many groups as it has rows (bench/results/row_reads.md): reading Arrow IPC
record batches costs microseconds, at twice the disk of snappy Parquet on the node's cache disk.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from srd_ray import storage
from srd_ray.encoding import prompts_of, text_columns, training_text
from srd_ray.errors import DataError
from srd_ray.shards import ROW_GROUP_ROWS
from srd_ray.storage import Location, Place

ROWS_FILE, IDS_FILE = "rows.arrow", "ids.arrow"  # a node's copy: one record batch per row; ids in file order
SCAN_ROWS = 64  # rows a scan reads at a time (a worker tokenizing a dataset once to learn its lengths)


def write_rows(table: pa.Table, place: Place) -> None:
    """A dataset's training rows, sorted by example_id, in small row groups (atomically)."""
    rows = training_text(table).sort_by("example_id")
    storage.write_parquet(place, rows, row_group_size=ROW_GROUP_ROWS)


def node_copy(paths: Sequence[Path]) -> Path:
    """This node's row-per-batch Arrow IPC copy of Parquet files (built once per node; a rewritten file
    gives a new copy)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError("no Parquet files to read rows from")
    identity = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths]

    def build(scratch: Path) -> None:
        schema = pq.ParquetFile(paths[0]).schema_arrow
        ids_schema = pa.schema([("example_id", pa.string())])
        rows_sink, ids_sink = pa.OSFile(str(scratch / ROWS_FILE), "wb"), pa.OSFile(str(scratch / IDS_FILE), "wb")
        with (
            rows_sink,
            ids_sink,
            pa.ipc.new_file(rows_sink, schema) as rows,
            pa.ipc.new_file(ids_sink, ids_schema) as ids,
        ):
            for path in paths:
                parquet = pq.ParquetFile(path, memory_map=False)
                for group in range(parquet.num_row_groups):
                    table = parquet.read_row_group(group).cast(schema)
                    for batch in table.to_batches(max_chunksize=1):
                        rows.write_batch(batch)
                    ids.write_table(table.select(["example_id"]).cast(ids_schema))

    return storage.cached_folder("rows", paths[0].parent.name or "rows", identity, build)


class RowFile:
    """One dataset's rows on this node, read by position or example_id. Holds the ids, sorted, as bytes
    (with each one's position in the file); ``peak_rows`` / ``peak_bytes`` record the most one read
    returned (the bound, measured)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.node_folder = folder = node_copy(paths)
        with pa.OSFile(str(folder / IDS_FILE)) as source:
            ids = pa.ipc.open_file(source).read_all()["example_id"].to_numpy(zero_copy_only=False)
        encoded = np.array([i.encode() for i in ids], dtype=bytes) if len(ids) else np.array([], dtype="S1")
        self.positions = np.argsort(encoded, kind="stable").astype(np.int64)
        self.sorted_ids = encoded[self.positions]
        if len(ids) > 1 and (self.sorted_ids[1:] == self.sorted_ids[:-1]).any():
            twice = self.sorted_ids[1:][self.sorted_ids[1:] == self.sorted_ids[:-1]][0].decode()
            raise DataError(f"row {twice} appears more than once in {[str(p) for p in paths]}")
        self.reader = pa.ipc.open_file(pa.OSFile(str(folder / ROWS_FILE)))
        self.schema = self.reader.schema
        self.peak_rows = self.peak_bytes = 0

    def __len__(self) -> int:
        return len(self.positions)

    def ids(self) -> list[str]:
        """Every example_id, sorted (the order every worker's pool of this dataset has)."""
        return [i.decode() for i in self.sorted_ids]

    def position(self, ids: Sequence[str]) -> np.ndarray:
        """The file positions of ``ids`` (a row that is not here is a DataError naming it)."""
        wanted = np.array([i.encode() for i in ids], dtype=bytes) if ids else np.array([], dtype="S1")
        found = np.searchsorted(self.sorted_ids, wanted).clip(max=max(len(self) - 1, 0))
        missing = [i for i, hit in zip(ids, found, strict=True) if not len(self) or self.sorted_ids[hit] != i.encode()]
        if missing:
            raise DataError(f"row {missing[0]} is in none of the files read")
        return self.positions[found]

    def read(self, ids: Sequence[str], columns: Sequence[str] | None = None) -> pa.Table:
        """The rows of ``ids``, in that order (repeats kept)."""
        return self.read_at(self.position(ids), columns)

    def read_at(self, positions: Sequence[int], columns: Sequence[str] | None = None) -> pa.Table:
        """The rows at these file positions, in that order, as one chunk."""
        batches = [self.reader.get_batch(int(p)) for p in positions]
        table = pa.Table.from_batches(batches, schema=self.schema)
        table = (table.select(list(columns)) if columns is not None else table).combine_chunks()
        self.peak_rows, self.peak_bytes = max(self.peak_rows, table.num_rows), max(self.peak_bytes, table.nbytes)
        return table

    def scan(self, columns: Sequence[str], rows: int = SCAN_ROWS) -> Iterator[pa.Table]:
        """Every row in file order, ``rows`` at a time (to scan a dataset once without holding it)."""
        for start in range(0, len(self), rows):
            yield self.read_at(range(start, min(start + rows, len(self))), columns)


def local_files(place: Place) -> list[Path]:
    """The Parquet files of a file or folder, as local paths: a folder on an object store is downloaded once
    per node (``storage.local_copy``)."""
    location = Location.of(place)
    if location.is_local and Path(location.path).is_file():
        return [Path(location.path)]
    folder = storage.local_copy(location)
    return sorted(path for path in Path(folder).rglob("*.parquet") if not path.name.startswith("."))


def lengths_of(rows: RowFile, encode) -> tuple[np.ndarray, np.ndarray]:
    """Each row's token length and scored (response) tokens, in file position order, tokenizing
    ``SCAN_ROWS`` rows at a time."""
    lengths, scored = np.zeros(len(rows), np.int32), np.zeros(len(rows), np.int32)
    position = 0
    for table in rows.scan(text_columns(rows.schema.names)[1:]):
        for prompt, response in zip(prompts_of(table), table["response"].to_pylist(), strict=True):
            example = encode(prompt, response)
            lengths[position], scored[position] = len(example.input_ids), example.scored_tokens
            position += 1
    return lengths, scored
