"""DVC metrics files that hold numbers only, each beside a sidecar JSON with the full record.

`dvc exp show` turns every key of every metrics file into a column: task names, hashes and failure
messages made it hundreds of columns wide and collapsed to "…". So a stage writes two files: the
record as it is to ``metrics/info/<same relative path>`` (a plain DVC out, read back by the report),
and its numbers to the metrics file DVC tracks. Booleans become 0 / 1; nulls and text are left out
(the sidecar keeps them, with the reasons); nested dicts keep their nesting (DVC shows ``a.b``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Union

from .fsutil import atomic_write_json

INFO_DIR = "info"   # metrics/<INFO_DIR>/...: the sidecars, never declared as DVC metrics


def numbers_only(record: dict) -> dict:
    """The numeric part of `record`: finite numbers, booleans as 0 / 1, lists of numbers, nested dicts."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            inner = numbers_only(value)
            if inner:
                out[key] = inner
        elif isinstance(value, list):
            if value and all(_number(v) is not None for v in value):
                out[key] = [_number(v) for v in value]
        elif _number(value) is not None:
            out[key] = _number(value)
    return out


def _number(value: Any) -> Optional[Union[int, float]]:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    return None


def info_path(metrics_root: Union[str, Path], relative: Union[str, Path]) -> Path:
    """Where the sidecar of ``<metrics_root>/<relative>`` lives: ``<metrics_root>/info/<relative>``."""
    return Path(metrics_root) / INFO_DIR / relative


def write_metrics(metrics_root: Union[str, Path], relative: Union[str, Path], record: dict) -> Path:
    """Write `record` to its sidecar, then its numbers to ``<metrics_root>/<relative>``; return the latter."""
    atomic_write_json(info_path(metrics_root, relative), record)
    path = Path(metrics_root) / relative
    atomic_write_json(path, numbers_only(record))
    return path


def read_record(metrics_root: Union[str, Path], relative: Union[str, Path]) -> Optional[dict]:
    """The full record a stage wrote (the sidecar; the metrics file itself when there is no sidecar).

    None when neither exists; ValueError naming the file when it is not valid JSON.
    """
    for path in (info_path(metrics_root, relative), Path(metrics_root) / relative):
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    return None
