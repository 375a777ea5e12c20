"""Instruction data: read JSONL / Parquet / hub datasets into one normalised Arrow table.

Every row gets
- ``example_id``: stable across runs (from a column if the spec names one, else a content hash), carried
  through every stage; stages are joined by id, never by row position;
- ``input_position``: the row's position in the source (files in sorted order, then line order), which
  defines "input order" for the ranking independently of how Ray schedules blocks;
- ``prompt``: the templated prompt; ``references``: list of reference responses; ``response``: the first
  reference, used as the training target.
A chat row (a ``messages`` column: OpenAI-style ``{role, content}`` turns, the last the assistant's) also
keeps ``messages`` (JSON text): models render it with their chat template (``srd_ray.chat``). Its
``response`` is the last assistant turn and its ``prompt`` the turns before it as plain "role: text" lines
(for ids, clustering and reading; no model sees that text).
Other scalar columns (``topic``, ``category``, the demo data's ``difficulty``) are passed through.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from srd_ray.chat import message_problem
from srd_ray.errors import DataError
from srd_ray.spec import DataSourceSpec, DataSpec
from srd_ray.storage import Location, is_uri

# File kinds a data folder is read for.
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")

CHUNK_ROWS = 8192  # rows held as Python objects at once while loading (see _TableBuilder)
CORE_COLUMNS = ("example_id", "input_position", "prompt", "references", "response", "messages")
_USUAL_NAMES = {
    "prompt": ("prompt",),
    "instruction": ("instruction",),
    "input": ("input", "context"),
    "response": ("output", "response", "references"),
}


@dataclass
class LoadedData:
    table: pa.Table
    skipped: list[dict[str, Any]] = field(default_factory=list)
    # Columns not carried through, with why (lists or objects; values of mixed types).
    dropped_columns: dict[str, str] = field(default_factory=dict)


def example_id_for(prompt: str, references: list[str]) -> str:
    """Content hash of prompt and references: the same row gets the same id in every run."""
    digest = hashlib.sha256(json.dumps([prompt, references], ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:20]


def load_source(source: DataSourceSpec, data: DataSpec, *, label: str) -> LoadedData:
    """Load and normalise one source (training data or an eval set). ``label`` names it in errors."""
    files = _resolve_files(source, label)
    records = _iter_records(source, files)
    rows = _TableBuilder()
    skipped: list[dict[str, Any]] = []
    seen_ids: dict[str, str] = {}
    mapping: dict[str, str | None] | None = None
    nested: set[str] = set()
    for where, record in records:
        if mapping is None:
            mapping = _resolve_mapping(source, record, where)
        nested.update(key for key, value in record.items() if isinstance(value, list | dict))
        try:
            row = _normalise(record, mapping, data, where)
            if row["example_id"] in seen_ids:
                raise DataError(
                    f"{where}: duplicate example_id {row['example_id']!r} (first seen at {seen_ids[row['example_id']]})"
                )
        except DataError as error:
            if data.on_bad_row == "error":
                raise
            skipped.append({"where": where, "reason": str(error).removeprefix(f"{where}: ")})
            continue
        seen_ids[row["example_id"]] = where
        row["input_position"] = len(rows) + len(skipped)
        rows.add(row)
        if source.max_rows is not None and len(rows) >= source.max_rows:
            break
    if not len(rows):
        raise DataError(f"{label}: {source.path} has no usable rows ({len(skipped)} skipped)")
    table, mixed = rows.table()
    dropped = dict.fromkeys(mixed, "values of mixed types")
    dropped.update({name: "lists or objects, not one value per row" for name in nested - set(mapping.values())})
    return LoadedData(table=table, skipped=skipped, dropped_columns=dropped)


def _resolve_files(source: DataSourceSpec, label: str) -> list[str]:
    if source.format == "hub":
        return []
    if is_uri(source.path):
        return _resolve_object_store_files(source, label)
    path = Path(source.path)
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix in DATA_SUFFIXES)
    elif any(ch in source.path for ch in "*?["):
        files = sorted(glob.glob(source.path))
    elif path.exists():
        files = [str(path)]
    elif source.format == "auto" and _looks_like_hub_id(source.path):
        return []
    else:
        raise DataError(f"{label}: data path {source.path} does not exist")
    if not files:
        raise DataError(f"{label}: no JSONL or Parquet files match {source.path}")
    return files


def _resolve_object_store_files(source: DataSourceSpec, label: str) -> list[str]:
    """A file or a folder of files on an object store."""
    if any(ch in source.path for ch in "*?["):
        raise DataError(f"{label}: {source.path}: globs work on local paths only; give the folder instead")
    try:
        location = Location.of(source.path)
        if location.is_file():
            return [source.path]
        files = [str(child) for child in location.children() if child.name.endswith(DATA_SUFFIXES)]
    except OSError as error:
        raise DataError(f"{label}: cannot read {source.path}: {error}") from None
    if not files:
        raise DataError(f"{label}: no JSONL or Parquet files at {source.path}")
    return files


def _looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/")) and "." not in parts[0]


def _iter_records(source: DataSourceSpec, files: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    if not files:
        yield from _iter_hub(source)
        return
    for file in files:
        kind = source.format if source.format != "auto" else ("parquet" if file.endswith(".parquet") else "jsonl")
        yield from (_iter_parquet(file) if kind == "parquet" else _iter_jsonl(file))


def _iter_jsonl(file: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with Location.of(file).open_binary() as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{file}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}: not UTF-8 ({error.reason} at byte {error.start})") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def _iter_parquet(file: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        parquet = Location.of(file).parquet_file()
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"{file}: not a readable Parquet file ({error})") from None
    row_index = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            yield f"{file}:row {row_index}", record
            row_index += 1


def _iter_hub(source: DataSourceSpec) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{source.path} is not a local path; reading hub datasets needs `pip install datasets`"
        ) from None
    try:
        dataset = datasets.load_dataset(source.path, data_files=source.data_files, split=source.split)
    except Exception as error:  # the hub client raises many types; the user needs the reason, not the type
        raise DataError(f"cannot load hub dataset {source.path} (split {source.split}): {error}") from None
    for index, record in enumerate(dataset):
        yield f"{source.path}[{source.split}]:row {index}", record


def _resolve_mapping(source: DataSourceSpec, record: dict[str, Any], where: str) -> dict[str, str | None]:
    """Pick the source column for each role, from the spec or the usual names."""
    mapping: dict[str, str | None] = {"id": source.fields.id}
    chat = _chat_column(source, record, where)
    if chat is not None:
        if mapping["id"] is not None and mapping["id"] not in record:
            raise DataError(f"{where}: id column {mapping['id']!r} is missing; columns: {sorted(record)}")
        return {**mapping, "messages": chat}
    for role, usual in _USUAL_NAMES.items():
        chosen = getattr(source.fields, role)
        if chosen is not None and chosen not in record:
            raise DataError(f"{where}: column {chosen!r} (data.fields.{role}) is missing; columns: {sorted(record)}")
        mapping[role] = chosen or next((name for name in usual if name in record), None)
    if mapping["id"] is not None and mapping["id"] not in record:
        raise DataError(f"{where}: id column {mapping['id']!r} is missing; columns: {sorted(record)}")
    if mapping["response"] is None:
        raise DataError(
            f"{where}: no response column (looked for {_USUAL_NAMES['response']}); set data.fields.response"
        )
    if mapping["prompt"] is None and mapping["instruction"] is None:
        raise DataError(f"{where}: no prompt or instruction column; set data.fields.prompt or data.fields.instruction")
    return mapping


def _chat_column(source: DataSourceSpec, record: dict[str, Any], where: str) -> str | None:
    """The messages column if rows are chat rows (named by data.fields.messages, or a `messages` column in
    data that names no prompt columns), else None."""
    named = source.fields.messages
    if named is not None:
        if named not in record:
            raise DataError(f"{where}: column {named!r} (data.fields.messages) is missing; columns: {sorted(record)}")
        return named
    prompt_named = source.fields.prompt is not None or source.fields.instruction is not None
    return "messages" if "messages" in record and not prompt_named else None


def _normalise_chat(record: dict[str, Any], mapping: dict[str, str | None], where: str) -> dict[str, Any]:
    messages = record.get(mapping["messages"])
    if isinstance(messages, str):  # a JSON string column (Parquet written without nested types)
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise DataError(f"{where}: column {mapping['messages']!r} is text that is not a JSON list") from None
    problem = message_problem(messages)
    if problem:
        raise DataError(f"{where}: column {mapping['messages']!r}: {problem}")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = json.dumps(messages, ensure_ascii=False)
    response = messages[-1]["content"]
    row = _with_id(record, mapping, text, [response], where)
    prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages[:-1])
    return {**row, "prompt": prompt, "references": [response], "response": response, "messages": text}


def _with_id(record: dict[str, Any], mapping: dict[str, str | None], text: str, references: list[str],
             where: str) -> dict[str, Any]:  # fmt: skip
    """``example_id`` (from the id column, else a hash of the row's text) and the passthrough columns."""
    if mapping["id"] is not None:
        example_id = record.get(mapping["id"])
        if example_id is None or str(example_id) == "":
            raise DataError(f"{where}: id column {mapping['id']!r} is empty")
        example_id = str(example_id)
    else:
        example_id = example_id_for(text, references)
    used = {name for name in mapping.values() if name}
    passthrough = {
        key: value
        for key, value in record.items()
        if key not in used and key not in CORE_COLUMNS and isinstance(value, str | int | float | bool)
    }
    return {"example_id": example_id, **passthrough}


def _normalise(record: dict[str, Any], mapping: dict[str, str | None], data: DataSpec, where: str) -> dict[str, Any]:
    if mapping.get("messages"):
        return _normalise_chat(record, mapping, where)
    references = _references(record.get(mapping["response"]), mapping["response"], where)
    if mapping["prompt"] is not None:
        prompt = _text(record.get(mapping["prompt"]), mapping["prompt"], where)
    else:
        instruction = _text(record.get(mapping["instruction"]), mapping["instruction"], where)
        extra = record.get(mapping["input"]) if mapping["input"] else None
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"{where}: column {mapping['input']!r} must be a string, got {type(extra).__name__}")
        template = data.prompt_template if extra and extra.strip() else data.prompt_template_no_input
        prompt = template.format(instruction=instruction, input=extra or "")
    row = _with_id(record, mapping, prompt, references, where)
    return {**row, "prompt": prompt, "references": references, "response": references[0]}


def _text(value: Any, column: str | None, where: str) -> str:
    if not isinstance(value, str):
        kind = "missing" if value is None else f"a {type(value).__name__}, not a string"
        raise DataError(f"{where}: column {column!r} is {kind}")
    if not value.strip():
        raise DataError(f"{where}: column {column!r} is empty")
    return value


def _references(value: Any, column: str | None, where: str) -> list[str]:
    if isinstance(value, list):
        if not value:
            raise DataError(f"{where}: column {column!r} is an empty list of references")
        return [_text(item, column, where) for item in value]
    return [_text(value, column, where)]


class _TableBuilder:
    """Rows into one Arrow table, ``CHUNK_ROWS`` at a time: a large source never exists as Python dicts
    all at once (they take ~50x the memory of its Arrow columns). A passthrough column keeps a type only if
    every row agrees, across chunks too; one whose values are of mixed types is dropped, not coerced."""

    def __init__(self) -> None:
        self.chunks: list[pa.Table] = []
        self.pending: list[dict[str, Any]] = []
        self.mixed: set[str] = set()
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def add(self, row: dict[str, Any]) -> None:
        self.pending.append(row)
        self.count += 1
        if len(self.pending) >= CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            chunk = _to_table(self.pending)
            self.mixed.update(name for row in self.pending for name in row if name not in chunk.column_names)
            self.chunks.append(chunk)
            self.pending = []

    def table(self) -> tuple[pa.Table, set[str]]:
        """The rows' table and the names of the columns dropped for mixed types."""
        self._flush()
        types: dict[str, set[pa.DataType]] = {}
        for chunk in self.chunks:
            for schema_field in chunk.schema:
                if not pa.types.is_null(schema_field.type):  # a chunk where every value is missing agrees
                    types.setdefault(schema_field.name, set()).add(schema_field.type)
        for name, kinds in types.items():  # as one array would: integers and floats together are floats
            if len(kinds) > 1 and all(pa.types.is_integer(k) or pa.types.is_floating(k) for k in kinds):
                types[name] = {pa.float64()}
        self.mixed |= {name for name, kinds in types.items() if len(kinds) > 1}
        core = [name for name in self.chunks[0].column_names if name in CORE_COLUMNS]
        extra = sorted({n for c in self.chunks for n in c.column_names} - set(core) - self.mixed)
        schema = pa.schema([(name, next(iter(types[name])) if name in types else pa.null()) for name in core + extra])
        unified = [_conform(chunk, schema) for chunk in self.chunks]
        self.chunks = []
        return pa.concat_tables(unified), self.mixed


def _conform(chunk: pa.Table, schema: pa.Schema) -> pa.Table:
    """``chunk`` with ``schema``'s columns in its order: a column the chunk lacks is all null."""
    columns = [chunk[f.name].cast(f.type) if f.name in chunk.column_names else pa.nulls(chunk.num_rows, f.type)
               for f in schema]  # fmt: skip
    return pa.Table.from_arrays(columns, schema=schema)


def _to_table(rows: list[dict[str, Any]]) -> pa.Table:
    core = {
        "example_id": pa.array([r["example_id"] for r in rows], pa.string()),
        "input_position": pa.array([r["input_position"] for r in rows], pa.int64()),
        "prompt": pa.array([r["prompt"] for r in rows], pa.string()),
        "references": pa.array([r["references"] for r in rows], pa.list_(pa.string())),
        "response": pa.array([r["response"] for r in rows], pa.string()),
    }
    if "messages" in rows[0]:
        core["messages"] = pa.array([r["messages"] for r in rows], pa.string())
    # Passthrough columns keep a type only if every row agrees; mixed columns are dropped, not coerced.
    extra_names = sorted({key for row in rows for key in row if key not in core})
    for name in extra_names:
        values = [row.get(name) for row in rows]
        try:
            core[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            continue
    return pa.table(core)


def drop_long_prompts(loaded: LoadedData, data: DataSpec, count_tokens: Callable[[list[str]], list[int]]) -> LoadedData:
    """With ``truncate_long_prompts: false``, a prompt over ``max_prompt_tokens`` is a bad row."""
    lengths = count_tokens(loaded.table["prompt"].to_pylist())
    reasons = {i: f"prompt has {length} tokens, over data.max_prompt_tokens ({data.max_prompt_tokens}) and "
               "data.truncate_long_prompts is false" for i, length in enumerate(lengths)
               if length > data.max_prompt_tokens}  # fmt: skip
    return drop_bad_rows(
        loaded, data, reasons, f"every prompt is over data.max_prompt_tokens ({data.max_prompt_tokens})"
    )


def drop_bad_rows(loaded: LoadedData, data: DataSpec, reasons: dict[int, str], all_bad: str) -> LoadedData:
    """Rows found bad after loading (``reasons``: row number -> why): an error naming the first
    (``on_bad_row: error``), or dropped and listed with the rows skipped while loading."""
    if not reasons:
        return loaded
    ids, positions = loaded.table["example_id"], loaded.table["input_position"]
    problems = [{"where": f"example_id {ids[i].as_py()} (input position {positions[i].as_py()})", "reason": reason}
                for i, reason in sorted(reasons.items())]  # fmt: skip
    if data.on_bad_row == "error":
        first = problems[0]
        raise DataError(f"{first['where']}: {first['reason']} ({len(problems)} such rows)")
    if len(reasons) == loaded.table.num_rows:
        raise DataError(f"{all_bad}; no usable rows")
    keep = pa.array([i not in reasons for i in range(loaded.table.num_rows)])
    return LoadedData(loaded.table.filter(keep), loaded.skipped + problems, loaded.dropped_columns)


def load_training_data(data: DataSpec) -> LoadedData:
    return load_source(data.train, data, label="data.train")


def load_eval_sets(data: DataSpec) -> dict[str, LoadedData]:
    return {name: load_source(source, data, label=f"data.eval_sets.{name}") for name, source in data.eval_sets.items()}


def row_positions(rows: pa.Table, ids: pa.ChunkedArray | pa.Array, what: str, stage: str) -> pa.ChunkedArray | pa.Array:
    """The positions in ``rows`` of the rows with ``ids`` (in the order of ``ids``): how a stage that holds
    only ids and its own columns takes the data's columns from the training rows the driver holds. Every
    id must be there: the error names ``what`` holds the ids and the ``stage`` that made them, to redo."""
    positions = pc.index_in(ids, value_set=rows["example_id"])
    if positions.null_count:
        missing = ids.filter(pc.is_null(positions))[0].as_py()
        raise DataError(f"{what}: example_id {missing!r} is not in the training data; rerun with --redo {stage}")
    return positions
