"""JSONL in and out for evaluation files; results are written to a temp file, then renamed."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from jdlm.errors import JdlmError


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise JdlmError(f"{path} does not exist or is not a file")
    rows = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise JdlmError(f"{path}:{number} is not valid JSON ({err.msg})") from None
    return rows


def write_jsonl_atomic(path: str | Path, rows) -> Path:
    return _write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json_atomic(path: str | Path, obj) -> Path:
    return _write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _write_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
