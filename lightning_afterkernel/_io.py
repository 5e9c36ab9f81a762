"""Files written whole or not at all, and strict JSON: what the callback and the reproduction grid write.

Each writer writes a temporary file beside the target (named by the process, so that ranks or concurrent runs do
not share one), then renames it over the target (``os.replace``, atomic on one filesystem): a reader, or a run
killed mid-write, sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def finite_or_none(value: Any) -> Any:
    """Strict JSON: NaN/inf become null (e.g. the soft-margin accuracy of a separable kernel), tensors plain
    lists, tuples lists."""
    if isinstance(value, torch.Tensor):
        return finite_or_none(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path to write; on success it replaces ``path``, on failure it is removed and ``path`` is
    left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, payload: Any) -> None:
    """``payload`` as indented strict JSON (:func:`finite_or_none`), flushed to disk before it replaces ``path``."""
    with replacing(path) as tmp, open(tmp, "w") as fh:
        json.dump(finite_or_none(payload), fh, indent=2, allow_nan=False)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_torch_save(payload: Any, path: Path) -> None:
    """``torch.save(payload)`` to ``path``, whole or not at all."""
    with replacing(path) as tmp:
        torch.save(payload, tmp)
