"""What a training worker trains on: its datasets' rows, encoded as training tokenizes them, with their
stored teacher signal, read as each micro-batch is built (``rows``): a worker holds its batches, not the
data set.

A stage's ``Pool`` is its datasets' rows in the same order on every worker (each dataset's rows sorted by
example_id), known by their token lengths, which is all the step plan needs (``batches``). A micro-batch's
rows are read, tokenized and paired with their signal when it is built.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from srd_ray.distill.batches import MicroBatch
from srd_ray.distill.rows import RowFile, lengths_of
from srd_ray.encoding import Conversation, Prompt, RowFormat, prompts_of, text_columns
from srd_ray.errors import DataError
from srd_ray.models import TrainingExample
from srd_ray.signals import TopK, signal_columns, signals_by_id

SIGNAL_DATASET = "teacher_signal"  # the dataset of stored top-k teacher signals, when there is one


class RowHost(Protocol):
    def files(self, dataset: str) -> list[Any]:
        """Local paths of a dataset's Parquet files (training rows, or the teacher signal's shards)."""


@dataclass(frozen=True)
class Dataset:
    """One dataset's rows in example_id order, known by length; read from ``rows`` when a batch needs them."""

    rows: RowFile
    lengths: np.ndarray  # int32, in example_id order
    scored_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


class Pool:
    """One stage's rows (its datasets' rows one after another): ``lengths`` and ``scored_tokens`` for the
    plan, rows read when a batch is built."""

    def __init__(self, rows: RowPool, datasets: Sequence[Dataset]) -> None:
        self.rows, self.datasets = rows, list(datasets)
        self.starts = np.cumsum([0] + [len(d) for d in self.datasets]).tolist()
        # int32 arrays, not lists of Python ints (36 B a row each): a worker's plan inputs stay small.
        self.lengths = np.concatenate([d.lengths for d in self.datasets] or [[]]).astype(np.int32)
        self.scored_tokens = np.concatenate([d.scored_tokens for d in self.datasets] or [[]]).astype(np.int32)

    def __len__(self) -> int:
        return self.starts[-1]

    def _where(self, row: int) -> tuple[int, int]:
        """(dataset number, rank of the row in that dataset's example_id order)."""
        number = bisect.bisect_right(self.starts, row) - 1
        return number, row - self.starts[number]

    def ids(self, rows: Sequence[int]) -> list[str]:
        return [self.datasets[d].rows.sorted_ids[i].decode() for d, i in map(self._where, rows)]

    def examples(self, rows: Sequence[int]) -> list[TrainingExample]:
        """The rows, read and encoded, in order."""
        return [self.rows.encode(*text) for text in self.texts(rows)]

    def texts(self, rows: Sequence[int]) -> list[tuple[Prompt, str]]:
        """The rows' (prompt, response), read, in order."""
        where = [self._where(row) for row in rows]
        text: dict[tuple[int, int], tuple[Prompt, str]] = {}
        for number in sorted({d for d, _ in where}):
            wanted = [i for d, i in where if d == number]
            source = self.datasets[number].rows
            table = source.read_at(source.positions[wanted], text_columns(source.schema.names)[1:])
            text.update(zip(((number, i) for i in wanted),
                            zip(prompts_of(table), table["response"].to_pylist(), strict=True),
                            strict=True))  # fmt: skip
        return [text[place] for place in where]

    def micro_batch(self, rows: Sequence[int], pad_token_id: int) -> MicroBatch:
        texts = self.texts(rows)
        examples = [self.rows.encode(*text) for text in texts]
        signals = self.rows.signals_for(self.ids(rows), examples)
        return MicroBatch.of(examples, pad_token_id, signals, self.rows.tail_temperatures,
                             self.rows.teacher_examples(texts, examples))  # fmt: skip


class ExamplePool:
    """Rows already encoded (the student's samples, and the teacher's rendering of them where it differs):
    the same interface as ``Pool``."""

    def __init__(
        self, examples: Sequence[TrainingExample], teacher_examples: Sequence[TrainingExample] | None = None
    ) -> None:
        self.items = list(examples)
        self.teacher_items = None if teacher_examples is None else list(teacher_examples)
        self.lengths = [len(e.input_ids) for e in self.items]
        self.scored_tokens = [e.scored_tokens for e in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def examples(self, rows: Sequence[int]) -> list[TrainingExample]:
        return [self.items[row] for row in rows]

    def micro_batch(self, rows: Sequence[int], pad_token_id: int) -> MicroBatch:
        teacher = None if self.teacher_items is None else [self.teacher_items[row] for row in rows]
        return MicroBatch.of(self.examples(rows), pad_token_id, teacher_examples=teacher)


def renders_apart(student: RowFormat, teacher: RowFormat) -> bool:
    """Whether two models can render a chat differently: another template text, or other special tokens
    for the template to insert (the vocabulary is the same: checked before training)."""
    same_tokens = student.tokenizer.special_tokens_map == teacher.tokenizer.special_tokens_map
    return student.template.text != teacher.template.text or not same_tokens


class RowPool:
    """A worker's datasets, opened once each (ids indexed, lengths learned by tokenizing every row once),
    and the stored teacher signal. ``teacher_tokenizer``: a teacher model that runs in the step, which
    renders chat rows with its own chat template."""

    def __init__(
        self,
        host: RowHost,
        tokenizer: Any,
        data: Any,
        topk: bool,
        tail_temperatures: tuple[float, ...],
        teacher_tokenizer: Any = None,
    ) -> None:
        self.host, self.tokenizer, self.data = host, tokenizer, data
        self.format = RowFormat(tokenizer, data)
        self.teacher_format = None if teacher_tokenizer is None else RowFormat(teacher_tokenizer, data)
        self._teacher_renders_apart: bool | None = None  # decided at the first chat row, then kept
        self.tail_temperatures = tail_temperatures
        self.datasets: dict[str, Dataset] = {}
        self.signals = RowFile(host.files(SIGNAL_DATASET)) if topk else None
        self.signal_columns = signal_columns(self.signals.schema.names) if self.signals else []

    def encode(self, prompt: Prompt, response: str) -> TrainingExample:
        return self.format.example(prompt, response)

    def teacher_examples(
        self, texts: Sequence[tuple[Prompt, str]], examples: Sequence[TrainingExample] | None = None
    ) -> list[TrainingExample] | None:
        """The rows as the teacher renders them (chat rows with its template), or None when no row differs
        from the student's ``examples`` (prompt/response rows never do: one prompt template, one vocabulary)."""
        if self.teacher_format is None or not any(isinstance(prompt, Conversation) for prompt, _ in texts):
            return None
        if self._teacher_renders_apart is None:
            self._teacher_renders_apart = renders_apart(self.format, self.teacher_format)
        if not self._teacher_renders_apart:  # the same template and special tokens: the same tokens, row by row
            return None
        examples = examples or [self.encode(*text) for text in texts]
        teacher = [self.teacher_format.example(*text) if isinstance(text[0], Conversation) else example
                   for text, example in zip(texts, examples, strict=True)]  # fmt: skip
        if all(t.input_ids == s.input_ids for t, s in zip(teacher, examples, strict=True)):
            return None
        return teacher

    def dataset(self, name: str) -> Dataset:
        if name not in self.datasets:
            rows = RowFile(self.host.files(name))
            lengths, scored = lengths_of(rows, self.encode)  # in file order
            self.datasets[name] = Dataset(rows, lengths[rows.positions], scored[rows.positions])
        return self.datasets[name]

    def stage(self, names: Sequence[str]) -> Pool:
        return Pool(self, [self.dataset(name) for name in names])

    def signals_for(self, ids: Sequence[str], examples: Sequence[TrainingExample]) -> list[TopK] | None:
        """The stored teacher signal of each row (None without one), which must cover exactly its scored
        tokens as training tokenizes them."""
        if self.signals is None:
            return None
        by_id = signals_by_id(self.signals.read(list(ids), self.signal_columns), self.tail_temperatures)
        for example_id, example in zip(ids, examples, strict=True):
            signal = by_id.get(example_id)
            if signal is None or len(signal.tail) != example.scored_tokens:
                found = "no signal" if signal is None else f"a signal for {len(signal.tail)} tokens"
                raise DataError(f"teacher_signal has {found} for row {example_id} ({example.scored_tokens} tokens)")
        return [by_id[example_id] for example_id in ids]

    def heldout_batches(self, heldout: Sequence[tuple[str, str, str]], batch_size: int) -> list[MicroBatch]:
        """The held-out KD metric's rows (few: given with the job) in micro-batches."""
        texts = [(prompt, response) for _, prompt, response in heldout]
        examples = [self.encode(*text) for text in texts]
        ids = [example_id for example_id, _, _ in heldout]
        pad = self.tokenizer.pad_token_id
        batches = []
        for start in range(0, len(examples), batch_size):
            part, window = examples[start : start + batch_size], slice(start, start + batch_size)
            signals = self.signals_for(ids[window], part)
            teacher = self.teacher_examples(texts[window], part)
            batches.append(MicroBatch.of(part, pad, signals, self.tail_temperatures, teacher))
        return batches

    def peak_held(self) -> dict[str, int]:
        """The most rows and bytes any of this worker's readers held at once (the memory bound, measured)."""
        readers = [d.rows for d in self.datasets.values()] + ([self.signals] if self.signals else [])
        return {"rows": max((r.peak_rows for r in readers), default=0),
                "bytes": sum(r.peak_bytes for r in readers)}  # fmt: skip
