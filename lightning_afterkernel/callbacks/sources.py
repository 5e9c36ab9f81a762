"""Where the callback's kernel subsets come from, drawn without touching the global random state.

The test subset comes from ``datamodule.tensors("test")`` when the datamodule has it (``BinaryPairDataModule``
does), else from ``datamodule.test_dataset`` / ``val_dataset`` or the validation dataloader's dataset (the one given
to ``fit`` or the model's hook, even when no validation runs); the train subset likewise from the training data. A
loader hook that fails (e.g. a test set built only in ``setup("test")``) is passed over for the next source. Any
map-style dataset returning ``(x, y)`` works; its transforms are applied when the subsets are drawn (once per fit),
with the global random state saved and restored around them, so training draws the same numbers with or without
the callback.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_afterkernel.callbacks._lightning import fit_val_loader
from lightning_afterkernel.callbacks.evaluation import Subsets
from lightning_afterkernel.errors import ConfigurationError, DataError


@contextlib.contextmanager
def global_rng_untouched(device: torch.device | None = None) -> Iterator[None]:
    """Run a block (a dataset's random transforms, an evaluation) without advancing torch's (CPU, and ``device``'s
    when it is a GPU), Python's or NumPy's global RNG: training draws the same numbers with or without the callback."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device is not None and device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def has_data(trainer: pl.Trainer) -> bool:
    """Whether the datamodule offers its data before fit starts (so the subsets can be checked at setup)."""
    dm = trainer.datamodule
    return dm is not None and (callable(getattr(dm, "tensors", None)) or bool(getattr(dm, "train_dataset", None)))


def find_source(trainer: pl.Trainer, split: str) -> tuple[Tensor, Tensor] | Any:
    """(x, y) tensors or a map-style dataset for ``split`` ("train" or "test"), first match wins:
    ``datamodule.tensors(split)``; the datamodule's datasets; its dataloaders' datasets; the
    dataloaders given to ``fit`` (the validation ones stand in for test data)."""
    dm = trainer.datamodule
    if dm is not None and callable(getattr(dm, "tensors", None)):
        return dm.tensors(split)
    names = ("train_dataset",) if split == "train" else ("test_dataset", "val_dataset")
    hooks = ("train_dataloader",) if split == "train" else ("test_dataloader", "val_dataloader")
    # (what, getter, gives a loader): tried in order, lazily; a loader hook that fails (e.g. a test set built
    # only in setup("test")) counts as "not available here", and the next one is tried.
    candidates: list[tuple[str, Any, bool]] = []
    if dm is not None:
        candidates += [(f"datamodule.{name}", lambda name=name: getattr(dm, name, None), False) for name in names]
        candidates += [(f"datamodule.{hook}()", lambda hook=hook: getattr(dm, hook)(), True) for hook in hooks]
    elif split == "train":
        candidates.append(("the training dataloader", lambda: trainer.train_dataloader, True))
    else:
        candidates.append(("the validation dataloaders given to fit()", lambda: fit_val_loader(trainer), True))
    problems = []
    for what, get, is_loader in candidates:
        try:
            found = get()
        except MisconfigurationException:  # the hook is not implemented
            continue
        except Exception as err:
            problems.append(f"{what} failed ({type(err).__name__}: {str(err)[:200]})")
            continue
        ds = getattr(found, "dataset", None) if is_loader else found
        if ds is not None:
            return ds
    what = "training" if split == "train" else "validation or test"
    raise DataError(
        f"AfterKernelCallback found no {what} data: give the Trainer a datamodule with `tensors(split)`, "
        f"`{names[0]}` or `{hooks[0]}()`, or pass {what} dataloaders to fit()."
        + (f" Tried: {'; '.join(problems)}." if problems else "")
    )


def _take(source: tuple[Tensor, Tensor] | Any, idx: Tensor) -> tuple[Tensor, Tensor]:
    """The examples ``idx`` of tensors or a dataset, labels flat: int64 when they are whole numbers, else as they
    are (for the label check at fit start to refuse)."""
    if isinstance(source, tuple):
        x, y = source[0][idx], source[1][idx]
    else:
        with global_rng_untouched():  # a dataset's random transforms must not shift training's draws
            items = [source[int(i)] for i in idx]
        x = torch.stack([torch.as_tensor(it[0]) for it in items])
        y = torch.as_tensor([torch.as_tensor(it[1]).item() for it in items])
    y = y.flatten()
    return x, y if y.is_floating_point() and not torch.equal(y, y.round()) else y.long()


def draw_subsets(
    trainer: pl.Trainer, n_train: int, n_test: int, seed: int, indices: Mapping[str, Tensor]
) -> tuple[Subsets, dict[str, Tensor]]:
    """The kernel subsets and their positions in the data: ``indices`` where they fit the data (a restored
    checkpoint's), else a draw from ``torch.Generator`` seeded ``seed`` (train) and ``seed + 1`` (test). The labels
    are checked at fit start (:func:`~lightning_afterkernel.callbacks._checks.check_model_and_labels`)."""
    data, drawn = {}, {}
    for split, n in (("train", n_train), ("test", n_test)):
        source = find_source(trainer, split)
        size = len(source[0]) if isinstance(source, tuple) else len(source)
        if n > size:
            raise ConfigurationError(
                f"AfterKernelCallback: n_{split}={n} is larger than the {size} {split} examples available; "
                f"lower n_{split} to at most {size}."
            )
        idx = indices.get(split)
        if idx is None or len(idx) != n or int(idx.max()) >= size:
            idx = torch.randperm(size, generator=torch.Generator().manual_seed(seed + (split == "test")))[:n]
        drawn[split] = idx
        data[split] = _take(source, idx)
    return Subsets(*data["train"], *data["test"]), drawn
