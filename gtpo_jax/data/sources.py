"""Prompt records `{id, prompt, answer, ...}` from JSONL or Parquet files and tensorflow-datasets
builders, with a configurable field mapping.

Presets name the common formats:

- `gsm8k`: `question`, and `answer` holding a worked solution that ends in `#### N` (N kept).
- `math`: `problem`, and `answer` when present, else the last `\\boxed{}` of `solution`
  (MATH-500, the MATH train set, AIME).
- `dapo`: `problem` and `answer` (DAPO-Math-17k).

Bad data fails loudly and precisely: the error names the file, the line, what was expected and
the fields the record does have. The prompt, id and answer fields are consumed; when the answer is
read out of a worked solution (GSM8K, boxed), that text is kept as `solution`; every other field
of a record is kept under its own name.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gtpo_jax.rewards.extract import last_boxed


class AnswerFrom(enum.StrEnum):
    """How the reference answer is read from the answer field."""

    AS_IS = "as_is"  # the field is the answer
    GSM8K = "gsm8k"  # the text after the last `####`
    BOXED = "boxed"  # the last \boxed{} of the field


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """Which fields of a file's records hold the prompt, the answer and the id."""

    # Field with the problem statement.
    prompt: str = "problem"
    # Field with the reference answer (or the solution it is read from).
    answer: str = "answer"
    # How the answer is read from that field.
    answer_from: AnswerFrom | str = AnswerFrom.AS_IS
    # Used when `answer` is absent: a field with a worked solution whose last \boxed{} is the answer.
    solution: str | None = None
    # Field with a unique id; when absent ids are "<file stem>-<line number>".
    id: str | None = "id"

    def __post_init__(self) -> None:
        object.__setattr__(self, "answer_from", AnswerFrom(self.answer_from))


PRESETS: dict[str, FieldMap] = {
    "gsm8k": FieldMap(prompt="question", answer="answer", answer_from=AnswerFrom.GSM8K, id=None),
    "math": FieldMap(prompt="problem", answer="answer", solution="solution"),
    "dapo": FieldMap(prompt="problem", answer="answer"),
}


class DataError(ValueError):
    """A record that cannot be used; the message says where and why."""


def _answer(raw: dict, fields: FieldMap, where: str) -> str:
    if fields.answer in raw:
        value = str(raw[fields.answer])
        if fields.answer_from is AnswerFrom.GSM8K:
            if "####" not in value:
                raise DataError(f"{where}: field {fields.answer!r} has no '#### <answer>' line (GSM8K format)")
            return value.rsplit("####", 1)[-1].strip().replace(",", "")
        if fields.answer_from is AnswerFrom.BOXED:
            boxed = last_boxed(value, tail_chars=len(value))
            if boxed is None:
                raise DataError(f"{where}: field {fields.answer!r} has no \\boxed{{}} answer")
            return boxed
        return value.strip()
    if fields.solution and fields.solution in raw:
        boxed = last_boxed(str(raw[fields.solution]), tail_chars=len(str(raw[fields.solution])))
        if boxed is None:
            raise DataError(f"{where}: no field {fields.answer!r} and no \\boxed{{}} in field {fields.solution!r}")
        return boxed
    wanted = f"{fields.answer!r}" + (f" or {fields.solution!r}" if fields.solution else "")
    raise DataError(f"{where}: missing field {wanted}; the record has fields {sorted(raw)}")


def to_record(raw: Any, fields: FieldMap, where: str, default_id: str) -> dict[str, Any]:
    """One prompt record from a raw mapping; `where` names the file and line (or row) for errors."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a record (JSON object / mapping), got {type(raw).__name__}")
    # tfds gives bytes; a Parquet column that is null in this row counts as a missing field.
    raw = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in raw.items() if v is not None}
    if fields.prompt not in raw:
        raise DataError(f"{where}: missing field {fields.prompt!r}; the record has fields {sorted(raw)}")
    record_id = raw.get(fields.id) if fields.id else None
    record = {k: v for k, v in raw.items() if k not in (fields.prompt, fields.id, fields.answer)}
    if fields.answer_from is not AnswerFrom.AS_IS and fields.answer in raw:
        record.setdefault("solution", raw[fields.answer])  # the worked solution the answer came from
    answer = _answer(raw, fields, where)
    if not answer.strip():
        # An empty reference would make an empty \boxed{} (or an empty "Answer:") correct.
        raise DataError(f"{where}: the reference answer (field {fields.answer!r}) is empty")
    record |= {
        "id": str(record_id) if record_id is not None else default_id,
        "prompt": str(raw[fields.prompt]),
        "answer": answer,
    }
    return record


def _fields(fields: FieldMap | str) -> FieldMap:
    if isinstance(fields, FieldMap):
        return fields
    if fields not in PRESETS:
        raise DataError(f"unknown field preset {fields!r}; known: {sorted(PRESETS)} (or pass a FieldMap)")
    return PRESETS[fields]


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    return path


def read_jsonl(path: str | os.PathLike, fields: FieldMap | str = "dapo") -> Iterator[dict[str, Any]]:
    """Yields `{"id", "prompt", "answer", **other fields}` for each line of a JSONL file."""
    fields, path = _fields(fields), _existing(path)
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            yield to_record(raw, fields, where, f"{path.stem}-{number}")


def read_parquet(path: str | os.PathLike, fields: FieldMap | str = "dapo") -> Iterator[dict[str, Any]]:
    """Yields prompt records from a Parquet file (rows numbered from 1 in errors and default ids)."""
    import pyarrow.parquet as pq

    fields, path = _fields(fields), _existing(path)
    try:
        table = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    number = 0
    for batch in table.iter_batches(batch_size=1024):
        for raw in batch.to_pylist():
            number += 1
            yield to_record(raw, fields, f"{path}:row {number}", f"{path.stem}-{number}")


def read_tfds(
    name: str, split: str = "train", fields: FieldMap | str = "gsm8k", data_dir: str | None = None
) -> Iterator[dict[str, Any]]:
    """Yields prompt records from a prepared tensorflow-datasets builder via `tfds.data_source`
    (random-access ArrayRecord files; TensorFlow is not needed). Byte strings are decoded as UTF-8."""
    import tensorflow_datasets as tfds

    fields = _fields(fields)
    source = tfds.data_source(name, split=split, data_dir=data_dir)
    for index in range(len(source)):
        yield to_record(dict(source[index]), fields, f"tfds:{name}/{split}[{index}]", f"{name}-{split}-{index}")


def read_records(kind: str, path: str, fields: FieldMap | str, *, split: str = "train", data_dir: str | None = None):
    """Dispatches on `kind` in {"jsonl", "parquet", "tfds"} (`path` is the builder name for tfds)."""
    if kind == "jsonl":
        return read_jsonl(path, fields)
    if kind == "parquet":
        return read_parquet(path, fields)
    if kind == "tfds":
        return read_tfds(path, split, fields, data_dir)
    raise DataError(f"unknown source kind {kind!r}; expected 'jsonl', 'parquet' or 'tfds'")
