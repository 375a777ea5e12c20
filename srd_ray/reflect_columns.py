"""The columns of a reflect shard, and the CPU side of the pass (ROUGE-L of each answer).

Light on purpose (Arrow and ``scoring`` only): the pass's writer actor unpickles ``add_rouge`` and
``shard_columns``, and a module that imported the engines would make that actor load torch and
transformers (seconds of CPU and hundreds of MB) to compute ROUGE and write Parquet.
"""

from __future__ import annotations

import pyarrow as pa

from srd_ray.scoring import rouge_l

INPUT_FIELDS = [
    pa.field("example_id", pa.string()),
    pa.field("input_position", pa.int64()),
    pa.field("prompt", pa.string()),
    pa.field("references", pa.list_(pa.string())),
    pa.field("response", pa.string()),
]
SIGNAL_FIELDS = [
    pa.field("student_answer", pa.string()),
    pa.field("rouge_l", pa.float64()),
    pa.field("student_ce", pa.float64()),
    pa.field("teacher_ce", pa.float64()),  # null unless reflect.teacher_ce
    pa.field("response_tokens", pa.int32()),
    pa.field("generated_tokens", pa.int32()),
    pa.field("prompt_truncated", pa.bool_()),
]


def add_rouge(rows: pa.Table) -> pa.Table:
    """The CPU part: ROUGE-L F of each answer against its best reference."""
    references = rows["references"].to_pylist()
    scores = [
        rouge_l(answer, refs) for answer, refs in zip(rows["student_answer"].to_pylist(), references, strict=True)
    ]
    return rows.append_column(pa.field("rouge_l", pa.float64()), pa.array(scores, pa.float64()))


def shard_columns(rows: pa.Table | None) -> pa.Schema:
    """The fixed input and signal columns first, then the data's passthrough columns."""
    fixed = {field.name for field in INPUT_FIELDS + SIGNAL_FIELDS}
    passthrough = [field for field in rows.schema if field.name not in fixed] if rows is not None else []
    return pa.schema(INPUT_FIELDS + SIGNAL_FIELDS + passthrough)
