"""The stored teacher signal as training reads it: one row's top-k distributions (``TopK``), the Parquet
columns the teacher pass writes them in, and their conversion back to arrays. A leaf: the teacher pass
(``teacher_signal``), the engines and training all use it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from srd_ray.errors import DataError
from srd_ray.spec import StageSpec

SIGNAL_COLUMNS = ["example_id", "num_tokens", "topk_ids", "topk_logprobs", "tail_logprob", "tempered_tail_logprobs"]
ADAPTIVE_COLUMN = "topk_counts"  # per token, ids kept (adaptive k only)


def signal_columns(names: list[str]) -> list[str]:
    """The columns training reads from signal shards with these column names."""
    return SIGNAL_COLUMNS + ([ADAPTIVE_COLUMN] if ADAPTIVE_COLUMN in names else [])


@dataclass(frozen=True)
class TopK:
    """A teacher's next-token distribution at each response token of one row: the ``k`` most likely ids,
    their log-probabilities (T = 1), the log of the probability mass outside them (the tail) and, for each
    training temperature T ≠ 1 asked for, the tail's tempered mass log Σ_tail p^(1/T) (unnormalised, like
    the re-tempered top-k log-probs): the top-k alone cannot give it, since it depends on the tail's shape."""

    ids: np.ndarray  # int32 [tokens, k]
    logprobs: np.ndarray  # float16 or float32 [tokens, k], most likely first
    tail: np.ndarray  # float32 [tokens]; -inf when the k ids hold all the mass
    tempered_tails: np.ndarray  # float32 [tokens, temperatures]; same -inf rule
    # Adaptive k: ids kept per token; a token's later columns are padding (its first id again, log-prob -inf).
    counts: np.ndarray | None = None  # int16 [tokens]

    def padded_to(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, logprobs) widened to ``width`` columns with padding (the token's first id, -inf): rows of
        different widths then stack into one micro-batch."""
        extra = width - self.ids.shape[1]
        if extra <= 0:
            return self.ids, self.logprobs
        ids = np.concatenate([self.ids, np.repeat(self.ids[:, :1], extra, axis=1)], axis=1)
        floor = np.full((len(self.ids), extra), -np.inf, dtype=self.logprobs.dtype)
        return ids, np.concatenate([self.logprobs, floor], axis=1)


def tail_temperatures(stages: Iterable[StageSpec]) -> tuple[float, ...]:
    """The temperatures whose tempered tail mass the pass stores: every stage's, but T = 1 (the tail)."""
    return tuple(sorted({stage.temperature for stage in stages} - {1.0}))


def signals_by_id(signal: pa.Table, temperatures: tuple[float, ...]) -> dict[str, TopK]:
    """Per example_id, the row's signal as arrays ([tokens, k] ids and log-probs, [tokens] tail, [tokens,
    temperatures] tempered tails; adaptive k: [tokens, the row's largest count], each token's later
    columns padding, and the counts). ``temperatures`` are the training stages' (:func:`tail_temperatures`),
    which the pass's settings fingerprint already tied to the shards."""
    result = {}
    adaptive = ADAPTIVE_COLUMN in signal.column_names
    for batch in signal.to_batches():
        rows = batch.column("num_tokens").to_numpy()
        ids = batch.column("topk_ids").flatten().to_numpy()
        logprobs = batch.column("topk_logprobs").flatten().to_numpy(zero_copy_only=False)
        tails = batch.column("tail_logprob").flatten().to_numpy()
        tempered = batch.column("tempered_tail_logprobs").flatten().to_numpy()
        tokens, width = int(rows.sum()), len(temperatures)
        if len(tempered) != tokens * width:
            raise DataError(
                f"teacher_signal stores {len(tempered)} tempered tail values for {tokens} tokens, "
                f"not one per training temperature {list(temperatures)}; rerun with --redo teacher_signal"
            )
        per_token = (batch.column(ADAPTIVE_COLUMN).flatten().to_numpy().astype(np.int64) if adaptive
                     else np.full(tokens, len(ids) // max(tokens, 1)))  # fmt: skip
        token_ends, id_ends = np.cumsum(rows), np.cumsum(per_token)
        for example_id, end, count in zip(batch.column("example_id").to_pylist(), token_ends, rows, strict=True):
            start = end - count
            first, last = (id_ends[start - 1] if start else 0), (id_ends[end - 1] if count else 0)
            counts = per_token[start:end]
            row_ids, row_logprobs = _padded(ids[first:last], logprobs[first:last], counts)
            result[example_id] = TopK(
                row_ids, row_logprobs,  # log-probs as stored (float16): fp32 per micro-batch
                tails[start:end], tempered[start * width : end * width].reshape(count, width),
                counts.astype(np.int16) if adaptive else None,
            )  # fmt: skip
    return result


def _padded(ids: np.ndarray, logprobs: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A row's ragged per-token ids and log-probs as [tokens, its largest count] arrays: a token's missing
    entries are its first id again, with log-prob -inf."""
    width = int(counts.max(initial=0))
    if len(counts) == 0 or (counts == width).all():
        return ids.reshape(len(counts), width), logprobs.reshape(len(counts), width)
    mask = np.arange(width) < counts[:, None]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out_ids = np.repeat(ids[starts][:, None], width, axis=1)
    out_ids[mask] = ids
    out_logprobs = np.full((len(counts), width), -np.inf, dtype=logprobs.dtype)
    out_logprobs[mask] = logprobs
    return out_ids, out_logprobs
