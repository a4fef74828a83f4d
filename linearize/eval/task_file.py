"""Task files: your own generation tasks as JSONL, one ``{"input": str, "target": str, ...}`` a
line, with any numeric fields (``length``, ``depth``, ...) to break accuracy down by. Greedy
generation; a line is correct when the continuation contains ``target``. Blank lines are
skipped."""

from __future__ import annotations

import json
from pathlib import Path


class TaskFileError(ValueError):
    """A task file line that cannot be used; the message names the file, line and field."""


def load_task_file(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    samples = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskFileError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise TaskFileError(f"{path}:{lineno}: expected a JSON object with 'input' and 'target'")
            for field in ("input", "target"):
                if field not in row:
                    raise TaskFileError(f"{path}:{lineno}: missing field '{field}'")
                if not isinstance(row[field], str) or (field == "target" and not row[field]):
                    raise TaskFileError(f"{path}:{lineno}: field '{field}' must be a non-empty string"
                                        if field == "target" else f"{path}:{lineno}: field '{field}' must be a string")
            samples.append({**row, "line": lineno})
    if not samples:
        raise TaskFileError(f"{path}: no samples (expected one JSON object a line)")
    return samples
