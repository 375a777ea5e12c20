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


def tail_temperatures(stages: Iterable[StageSpec]) -> tuple[float, ...]:
    """The temperatures whose tempered tail mass the pass stores: every stage's, but T = 1 (the tail)."""
    return tuple(sorted({stage.temperature for stage in stages} - {1.0}))


def signals_by_id(signal: pa.Table, temperatures: tuple[float, ...]) -> dict[str, TopK]:
    """Per example_id, the row's signal as arrays ([tokens, k] ids and log-probs, [tokens] tail, [tokens,
    temperatures] tempered tails). ``temperatures`` are the training stages' (:func:`tail_temperatures`),
    which the pass's settings fingerprint already tied to the shards."""
    result = {}
    for batch in signal.to_batches():
        columns = {name: batch.column(name) for name in SIGNAL_COLUMNS}
        counts = columns["num_tokens"].to_numpy()
        ids = columns["topk_ids"].flatten().to_numpy()
        logprobs = columns["topk_logprobs"].flatten().to_numpy(zero_copy_only=False)
        tails = columns["tail_logprob"].flatten().to_numpy()
        tempered = columns["tempered_tail_logprobs"].flatten().to_numpy()
        tokens, width = int(counts.sum()), len(temperatures)
        k = len(ids) // max(tokens, 1)
        if len(tempered) != tokens * width:
            raise DataError(
                f"teacher_signal stores {len(tempered)} tempered tail values for {tokens} tokens, "
                f"not one per training temperature {list(temperatures)}; rerun with --redo teacher_signal"
            )
        ends = np.cumsum(counts)
        for example_id, end, count in zip(columns["example_id"].to_pylist(), ends, counts, strict=True):
            start = end - count
            result[example_id] = TopK(
                ids[start * k : end * k].reshape(count, k),
                logprobs[start * k : end * k].reshape(count, k),  # as stored (float16): fp32 per micro-batch
                tails[start:end],
                tempered[start * width : end * width].reshape(count, width),
            )
    return result
