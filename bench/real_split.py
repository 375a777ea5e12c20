"""A train/test split of the real instruction sets in ../shared/data/eval, for SRD on real data (#17 b).

- **Training pool:** a seeded 80 % of Dolly and of S-NI.
- **Test sets:** the other 20 % of each (``dolly_test``, ``sinst_test``), plus all of Self-Instruct and
  Vicuna (which no training row comes from).
- **No example is both trained and evaluated on.** Rows are keyed by their prompt with whitespace and case
  normalised. A training candidate whose key appears in any test set is left out of training, and so is a
  repeat of a key already taken. ``tests/test_real_split.py`` checks this on the written files.

Files are plain MiniLLM-format JSON lines (the sources' fields, unchanged), written atomically:

    python bench/real_split.py OUT_DIR     # OUT_DIR/{train,dolly_test,sinst_test,self-inst,vicuna}.jsonl
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

SHARED_EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"
TRAIN_FRACTION = 0.8
SPLIT_SEED = 0
SPLIT_SETS = ("dolly", "sinst")  # split into train / test
TEST_ONLY_SETS = ("self-inst", "vicuna")


def example_key(row: dict) -> str:
    """What makes two rows the same example: the prompt, whitespace and case normalised."""
    return hashlib.sha256(" ".join(row["prompt"].lower().split()).encode()).hexdigest()


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def split(shared_eval: Path = SHARED_EVAL) -> dict[str, list[dict]]:
    """{"train": rows, "<set>_test" / "<set>": rows}: disjoint by ``example_key``."""
    candidates: list[dict] = []
    sets: dict[str, list[dict]] = {}
    for name in SPLIT_SETS:
        rows = read_rows(shared_eval / f"{name}.jsonl")
        random.Random(f"{SPLIT_SEED}-{name}").shuffle(rows)
        cut = round(len(rows) * TRAIN_FRACTION)
        candidates += rows[:cut]
        sets[f"{name}_test"] = rows[cut:]
    for name in TEST_ONLY_SETS:
        sets[name] = read_rows(shared_eval / f"{name}.jsonl")
    tested = {example_key(row) for rows in sets.values() for row in rows}
    train, taken = [], set()
    for row in candidates:
        key = example_key(row)
        if key not in tested and key not in taken:
            taken.add(key)
            train.append(row)
    return {"train": train, **sets}


def write_split(out_dir: Path, shared_eval: Path = SHARED_EVAL) -> dict[str, Path]:
    """Write the split once (each file atomically); returns {name: path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ["train", *(f"{name}_test" for name in SPLIT_SETS), *TEST_ONLY_SETS]
    paths = {name: out_dir / f"{name}.jsonl" for name in names}
    if not all(path.exists() for path in paths.values()):
        for name, rows in split(shared_eval).items():
            partial = paths[name].with_suffix(".partial")
            partial.write_text("".join(json.dumps(row) + "\n" for row in rows))
            partial.rename(paths[name])
    return paths


if __name__ == "__main__":
    for name, path in write_split(Path(sys.argv[1])).items():
        print(f"{name}: {len(path.read_text().splitlines())} rows -> {path}")
