"""JSONL in and out for evaluation files; every result (JSONL, JSON, CSV, PNG) is written to a
temp file, then renamed, so nothing half-written is left on disk."""

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
    return write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json_atomic(path: str | Path, obj) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide results from other users
        with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
