"""Files written whole or not at all, and strict JSON (lightning_afterkernel._io)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_afterkernel._io import atomic_torch_save, atomic_write_json, finite_or_none


def test_strict_json_has_nulls_for_non_finite_numbers_and_lists_for_tensors_and_tuples():
    value = {"a": math.nan, "b": [1.0, math.inf, (2, -math.inf)], "c": torch.tensor([0.5, math.nan]), "d": "x"}
    assert finite_or_none(value) == {"a": None, "b": [1.0, None, [2, None]], "c": [0.5, None], "d": "x"}


def test_json_written_then_read_back(tmp_path):
    path = tmp_path / "deep" / "results.json"  # the folder is made
    atomic_write_json(path, {"acc": 0.98, "soft": math.nan})
    assert json.loads(path.read_text()) == {"acc": 0.98, "soft": None}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"rows": [1, 2]})
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic_write_json(path, {"rows": [1, 2, object()]})
    assert json.loads(path.read_text()) == {"rows": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_torch_payloads_saved_whole(tmp_path, monkeypatch):
    path = tmp_path / "kernels.pt"
    atomic_torch_save({"k": torch.eye(3)}, path)
    assert torch.equal(torch.load(path)["k"], torch.eye(3))

    def fail(payload, f):
        open(f, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"k": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path)["k"], torch.eye(3)) and [p.name for p in tmp_path.iterdir()] == ["kernels.pt"]
