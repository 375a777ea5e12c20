"""The rows a training job trains on, read as it trains: a worker holds the rows and teacher signal of the
micro-batches it is building, not the data set.

Layout. Before training, the driver writes each dataset a job trains on (a rank bucket, all rows) as one
Parquet file, ``<stage dir>/rows/<name>/part-00000.parquet``: ``example_id``, ``prompt``, ``response``,
sorted by example_id, in row groups of ``ROW_GROUP_ROWS`` (16) rows. The teacher pass writes its signal shards in row
groups of the same size. A worker indexes a file from its ``example_id`` column alone, tokenizes a dataset
once, group by group, to learn each row's length (the step plan needs lengths, not tokens), and then reads,
per micro-batch, only the row groups that hold its rows: their text, and the signal in its stored dtypes
(float16 log-probs), made fp32 tensors for that micro-batch only. A small cache of the row groups read last
spares rereads within a step.

Why files and row groups: the step plan is a seeded permutation per epoch that every worker computes alike
(exact resume, the same steps on 1 worker or 8), so a worker needs random access by row. Ray Data's
streaming split hands rows in an order of its own, and objects in Ray's object store are mapped whole into
every reader: a worker touching every row once an epoch would end up resident on the whole data set.
Parquet row groups on the run directory's filesystem (a local or shared disk; a run on an object store is
downloaded once per node) are read by range and then dropped.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from srd_ray import storage
from srd_ray.errors import DataError
from srd_ray.shards import ROW_GROUP_ROWS
from srd_ray.storage import Location, Place

TRAINING_COLUMNS = ["example_id", "prompt", "response"]
CACHE_GROUPS = 16  # row groups a reader keeps after reading them, by default


def write_rows(table: pa.Table, place: Place) -> None:
    """A dataset's training rows, sorted by example_id, in small row groups (atomically)."""
    rows = table.select(TRAINING_COLUMNS).sort_by("example_id")
    storage.write_parquet(place, rows, row_group_size=ROW_GROUP_ROWS)


@dataclass(frozen=True, slots=True)  # one per row of a dataset in every worker: no per-instance dict
class RowAddress:
    file: int  # index into the files
    group: int  # row group within the file
    offset: int  # row within the group


class RowFiles:
    """Parquet files indexed by example_id (read from local paths: see :func:`local_files`)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.files = [pq.ParquetFile(path, memory_map=False) for path in paths]
        self.where: dict[str, RowAddress] = {}
        for number, parquet in enumerate(self.files):
            for group in range(parquet.num_row_groups):
                ids = parquet.read_row_group(group, columns=["example_id"])["example_id"].to_pylist()
                for offset, example_id in enumerate(ids):
                    self.where[example_id] = RowAddress(number, group, offset)

    def __len__(self) -> int:
        return len(self.where)

    def ids(self) -> list[str]:
        """Every example_id, sorted (the order every worker's pool of this dataset has)."""
        return sorted(self.where)

    def groups(self, columns: list[str]) -> Iterator[pa.Table]:
        """Every row group in turn (to scan a dataset once without holding it)."""
        for parquet in self.files:
            for group in range(parquet.num_row_groups):
                yield parquet.read_row_group(group, columns=columns)


@dataclass
class RowReader:
    """Rows by example_id from ``RowFiles``, through a cache of the ``cache_groups`` row groups read last
    (a trainer sizes it to a micro-batch: its rows are in at most that many groups). ``peak_rows`` /
    ``peak_bytes`` record the most it ever held at once: the bound, measured."""

    source: RowFiles
    columns: list[str]
    cache_groups: int = CACHE_GROUPS
    cache: collections.OrderedDict[tuple[int, int], pa.Table] = field(default_factory=collections.OrderedDict)
    peak_rows: int = 0
    peak_bytes: int = 0

    def read(self, ids: Sequence[str]) -> pa.Table:
        """The rows of ``ids``, in that order."""
        try:
            addresses = [self.source.where[example_id] for example_id in ids]
        except KeyError as missing:
            raise DataError(f"row {missing.args[0]} is in none of the files read ({self.columns})") from None
        if not addresses:
            return pa.table({c: [] for c in self.columns})
        # Each row group once, then one take over them all (not a slice and a concatenation per row).
        keys = list(dict.fromkeys((address.file, address.group) for address in addresses))
        groups = [self._group(*key) for key in keys]
        starts = dict(zip(keys, itertools.accumulate((g.num_rows for g in groups), initial=0), strict=False))
        rows = [starts[(address.file, address.group)] + address.offset for address in addresses]
        return pa.concat_tables(groups).take(pa.array(rows, pa.int64()))

    def _group(self, file: int, group: int) -> pa.Table:
        key = (file, group)
        if key in self.cache:
            self.cache.move_to_end(key)
            return self.cache[key]
        table = self.source.files[file].read_row_group(group, columns=self.columns)
        self.cache[key] = table
        while len(self.cache) > self.cache_groups:
            self.cache.popitem(last=False)
        self.peak_rows = max(self.peak_rows, sum(t.num_rows for t in self.cache.values()))
        self.peak_bytes = max(self.peak_bytes, sum(t.nbytes for t in self.cache.values()))
        return table


def local_files(place: Place) -> list[Path]:
    """The Parquet files of a file or folder, as local paths: a folder on an object store is downloaded once
    per node (``storage.local_copy``)."""
    location = Location.of(place)
    if location.is_local and Path(location.path).is_file():
        return [Path(location.path)]
    folder = storage.local_copy(location)
    return sorted(path for path in Path(folder).rglob("*.parquet") if not path.name.startswith("."))


def lengths_of(files: RowFiles, encode) -> tuple[dict[str, int], dict[str, int]]:
    """Each row's token length and scored (response) tokens, tokenizing one row group at a time."""
    lengths, scored = {}, {}
    for group in files.groups(TRAINING_COLUMNS):
        for example_id, prompt, response in zip(*(group[c].to_pylist() for c in TRAINING_COLUMNS), strict=True):
            example = encode(prompt, response)
            lengths[example_id], scored[example_id] = len(example.input_ids), example.scored_tokens
    return lengths, scored
