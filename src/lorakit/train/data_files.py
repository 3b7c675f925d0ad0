"""Reading training records from disk: .json, .jsonl, .csv, .parquet, and `datasets.save_to_disk` folders.

Every reader returns plain Python lists of dicts (data sets here are thousands of rows, not billions),
so the rest of the pipeline never depends on `datasets`, pandas or pyarrow. Those are imported lazily,
only for the file types that need them.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass

from lorakit.text_files import read_text

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
# Split names of a saved DatasetDict that serve as the validation split, in order of preference.
VALIDATION_SPLIT_NAMES = ("validation", "test")


@dataclass
class LoadedFile:
    """Rows read from one path. `val_rows` is set only for a saved DatasetDict with a validation split.
    `lines`: the line of the file each row starts on (JSON lines and CSV), for messages; None otherwise."""

    rows: list[dict]
    val_rows: list[dict] | None = None
    val_split_name: str | None = None
    lines: list[int] | None = None

    def origins(self, path: str, val: bool = False) -> list["Origin"]:
        """Where each row (or validation row) comes from, for messages."""
        if val:
            return [Origin(f"{path}[{self.val_split_name}]", i, None) for i in range(len(self.val_rows or []))]
        return [Origin(path, i, self.lines[i] if self.lines else None) for i in range(len(self.rows))]


@dataclass(frozen=True)
class Origin:
    """Where a record comes from: its file, its index there and, for JSON lines and CSV, its line."""

    path: str
    index: int
    line: int | None = None

    def __str__(self) -> str:  # "data/train.jsonl, line 12 (record 11)"
        return f"{self.path}, {self.short()}" + (f" (record {self.index})" if self.line else "")

    def short(self) -> str:  # "line 12", or "record 11" without line numbers
        return f"line {self.line}" if self.line else f"record {self.index}"


def read_rows(path: str) -> LoadedFile:
    """Read every row of a data file or a `save_to_disk` directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _read_saved_dataset(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Data file not found: {path!r}. Give a {', '.join(SUPPORTED_SUFFIXES)} file or a folder written "
            "by datasets.Dataset.save_to_disk."
        )
    suffix = os.path.splitext(path)[1].lower()
    readers = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise ValueError(
            f"Cannot read {path!r}: unknown file type {suffix or '(no suffix)'!r}. "
            f"Supported: {', '.join(SUPPORTED_SUFFIXES)}, or a datasets.save_to_disk folder."
        )
    rows, lines = readers[suffix](path)
    _check_rows_are_objects(rows, path, lines)
    return LoadedFile(rows=rows, lines=lines)


def _read_json(path: str) -> tuple[list[dict], list[int] | None]:
    """A JSON list of objects, or {"data": [...]}. A .json file holding JSON lines is read as .jsonl."""
    text = read_text(path, "data files")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON lines saved as .json
            return _parse_jsonl(text, path)
        raise ValueError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        return data["data"], None
    if isinstance(data, dict):  # one record on its own
        return [data], None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of objects or {{\"data\": [...]}}, found {type(data).__name__}")
    return data, None


def _read_jsonl(path: str) -> tuple[list[dict], list[int]]:
    return _parse_jsonl(read_text(path, "data files"), path)


def _parse_jsonl(text: str, path: str) -> tuple[list[dict], list[int]]:
    rows, lines = [], []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        lines.append(line_number)
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}, line {line_number}: not valid JSON ({err.msg} at column {err.colno}). Each line of a "
                f"JSON-lines file must be one complete JSON object. The line starts: {line[:80]!r}"
            ) from None
    return rows, lines


def _read_csv(path: str) -> tuple[list[dict], list[int]]:
    """Every cell is a string (an empty cell is ""); `text_label` reads integer-looking labels as ints."""
    reader = csv.DictReader(io.StringIO(read_text(path, "data files"), newline=""))
    rows, lines, end_of_previous = [], [], 1  # line 1 is the header
    try:
        for row in reader:
            if None in row:  # more cells than the header has columns
                raise ValueError(f"{path} line {end_of_previous + 1}: {len(row) - 1 + len(row[None])} cells but the "
                                 f"header has {len(reader.fieldnames)} columns ({', '.join(reader.fieldnames)}); "
                                 "quote cells that contain commas")
            rows.append(dict(row))
            lines.append(end_of_previous + 1)
            end_of_previous = reader.line_num  # a quoted cell may span several lines
    except csv.Error as err:
        raise ValueError(f"{path} line {reader.line_num}: not valid CSV ({err})") from None
    return rows, lines


def _read_parquet(path: str) -> tuple[list[dict], None]:
    import pyarrow.parquet as pq  # lazy: only parquet users pay for the import

    return pq.read_table(path).to_pylist(), None


def _read_saved_dataset(path: str) -> LoadedFile:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any(os.path.exists(os.path.join(path, m)) for m in markers):
        found = sorted(os.listdir(path))[:10]
        raise ValueError(
            f"{path!r} is a folder but not a saved dataset (no {' / '.join(markers)}; found: {found}). "
            "Give a data file path, or a folder written by datasets.Dataset.save_to_disk."
        )
    import datasets  # lazy: heavy import

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.Dataset):
        return LoadedFile(rows=loaded.to_list())
    if "train" not in loaded:
        raise ValueError(
            f"The saved DatasetDict at {path!r} has no 'train' split (splits: {sorted(loaded)}). "
            "Save the training rows under the 'train' key."
        )
    val_name = next((name for name in VALIDATION_SPLIT_NAMES if name in loaded), None)
    val_rows = loaded[val_name].to_list() if val_name else None
    return LoadedFile(rows=loaded["train"].to_list(), val_rows=val_rows, val_split_name=val_name)


def _check_rows_are_objects(rows: list, path: str, lines: list[int] | None) -> None:
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            where = f"line {lines[index]}" if lines else f"record {index}"
            raise ValueError(
                f"{path}: {where} is a {type(row).__name__}, not an object. Every record must be a "
                "JSON object such as {\"instruction\": ..., \"output\": ...}."
            )
