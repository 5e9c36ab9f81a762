"""One scale's folder of cell files: the complete runs, the runs started and not finished, what the scale's grid
expects, and each claim judged there (final once the cells it reads are complete, else pending).

A folder may be absent, empty or partly run (the grid writes its cells one by one): :func:`load_scale` reads what
is there, and :class:`ScaleRuns` says what is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lightning_afterkernel.errors import ConfigurationError
from lightning_afterkernel.reporting.claims import CLAIM_VARIANTS, Claim, variant
from lightning_afterkernel.reporting.grid import CELL_FILENAME, Scale, grid_cells, load_complete, read_cell, scale_key
from lightning_afterkernel.reporting.stats import get_path

Runs = dict[str, list[dict[str, Any]]]
"""Complete cell files by cell name, seeds in order."""


def _cell_files(root: str | Path) -> list[tuple[Path, dict[str, Any], bool]]:
    """Every cell file under ``root`` that parses: (path, contents, complete)."""
    found = []
    for path in sorted(Path(root).glob(f"*/seed*/{CELL_FILENAME}")):
        data = load_complete(path)
        if data is not None:
            found.append((path, data, True))
        elif (started := read_cell(path)) is not None and started.get("complete") is False:
            found.append((path, started, False))
    return found


def _check_one_scale(root: str | Path, files: list[tuple[Path, dict[str, Any], bool]]) -> None:
    """Raise when the cell files come from more than one scale: their numbers are not comparable."""
    scales: dict[str, list[Path]] = {}
    for path, data, _ in files:
        key = json.dumps([data.get("scale"), scale_key(get_path(data, ("config", "scale")) or {})], sort_keys=True)
        scales.setdefault(key, []).append(path)
    if len(scales) > 1:
        found = "; ".join(
            f"scale {json.loads(key)[0]!r} ({len(paths)} files, e.g. {paths[0]})" for key, paths in scales.items()
        )
        raise ConfigurationError(
            f"the cell files under {root} come from different scales or scale definitions: {found}. A report compares "
            "cells of one scale: put each scale's runs in its own folder (reproduce --out) and report each folder."
        )


def _group(files: list[tuple[Path, dict[str, Any], bool]]) -> Runs:
    runs: Runs = {}
    for _, data, _ in files:
        runs.setdefault(data["cell"], []).append(data)
    for seeds in runs.values():
        seeds.sort(key=lambda d: d["seed"])
    return runs


def load_runs(root: str | Path) -> Runs:
    """Complete cell files under ``root``, grouped by cell name (seeds in order); incomplete ones are ignored.

    Raises :class:`ConfigurationError` when they come from more than one scale: their numbers are not comparable.
    """
    files = [f for f in _cell_files(root) if f[2]]
    _check_one_scale(root, files)
    return _group(files)


def _as_scale(config: dict[str, Any]) -> Scale:
    """The :class:`Scale` a cell file's ``config.scale`` describes (fields older files lack take their defaults)."""
    known = {f.name for f in fields(Scale)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in known}
    return Scale(**values)


@dataclass
class ScaleClaim:
    """One claim judged at one scale from the cells complete so far; pending until all the cells it reads are."""

    claim: Claim
    needed: list[str]  # the cells of the scale's grid the claim reads
    complete: list[str]  # those with every seed complete
    partial: list[str]  # those with some seeds complete

    @property
    def pending(self) -> bool:
        return not self.needed or len(self.complete) < len(self.needed)

    @property
    def word(self) -> str:
        """The verdict, or ``pending``."""
        return "pending" if self.pending else self.claim.verdict

    def text(self) -> str:
        """The verdict with what it rests on: its coverage, or for a pending one how many cells are complete and
        the verdict so far."""
        if not self.pending:
            return self.claim.verdict_text
        if not self.needed:
            return "pending: no cell files yet"
        done = f"pending: {len(self.complete)} of {len(self.needed)} cells complete"
        if self.partial:
            done += f", {len(self.partial)} partly"
        so_far = self.claim.verdict
        return done if so_far == "not measured" else f"{done}; so far {so_far}"


@dataclass
class ScaleRuns:
    """The cell files of one scale's folder and what that scale's grid expects of it."""

    folder: str
    runs: Runs  # complete cell files
    started: dict[str, list[int]]  # cell -> seeds whose run started and has not finished (running or interrupted)
    config: dict[str, Any] | None  # the scale's definition from the cell files; None: the folder holds none

    @property
    def name(self) -> str | None:
        return None if self.config is None else self.config.get("name")

    @property
    def label(self) -> str:
        """The scale's name, or the folder while it holds no cell file."""
        return self.name or self.folder

    @property
    def expected_cells(self) -> list[str]:
        return [] if self.config is None else [c.name for c in grid_cells(_as_scale(self.config))]

    @property
    def expected_seeds(self) -> int:
        """The scale's seed count, or more where the folder holds more seeds (``reproduce --seeds``)."""
        seen = [d["seed"] for seeds in self.runs.values() for d in seeds]
        seen += [s for seeds in self.started.values() for s in seeds]
        return max([int((self.config or {}).get("seeds") or 0), *(s + 1 for s in seen)])

    def seeds_done(self, cell: str) -> int:
        return len(self.runs.get(cell, []))

    def is_complete(self, cell: str) -> bool:
        return self.seeds_done(cell) >= self.expected_seeds

    @property
    def n_files(self) -> int:
        return sum(map(len, self.runs.values()))

    def progress(self) -> str:
        """How much of the grid is done, e.g. "10 of 12 cells complete (33 of 36 runs; 1 running or interrupted)"."""
        if self.config is None:
            return "no cell files yet"
        cells = self.expected_cells
        done = sum(self.is_complete(c) for c in cells)
        runs = sum(min(self.seeds_done(c), self.expected_seeds) for c in cells)
        started = sum(map(len, self.started.values()))
        text = f"{done} of {len(cells)} cells complete ({runs} of {len(cells) * self.expected_seeds} runs"
        return text + (f"; {started} running or interrupted)" if started else ")")

    def missing(self) -> list[str]:
        """The incomplete cells grouped by how many seeds they have, e.g. "2 of 3 seeds: cifar10-vgg-noaug (seed 2
        running or interrupted), cifar10-vgg-aug", then "pending: ..." for those with no complete seed."""
        groups: dict[int, list[str]] = {}
        for cell in self.expected_cells:
            if not self.is_complete(cell):
                started = sorted(self.started.get(cell, []))
                note = f" (seed {', '.join(map(str, started))} running or interrupted)" if started else ""
                groups.setdefault(self.seeds_done(cell), []).append(cell + note)
        return [
            f"{f'{done} of {self.expected_seeds} seeds' if done else 'pending'}: {', '.join(cells)}"
            for done, cells in sorted(groups.items(), reverse=True)
        ]

    def judge(self, claim: Claim) -> ScaleClaim:
        """``claim`` (judged from :attr:`runs`) with the cells it reads at this scale and how many are complete."""
        needed = [c for c in self.expected_cells if variant(c) in CLAIM_VARIANTS[claim.key]]
        complete = [c for c in needed if self.is_complete(c)]
        partial = [c for c in needed if c not in complete and self.seeds_done(c)]
        return ScaleClaim(claim, needed, complete, partial)


def load_scale(root: str | Path) -> ScaleRuns:
    """The cell files under ``root`` (absent or empty: none), complete or started; raises
    :class:`ConfigurationError` when they come from more than one scale."""
    files = _cell_files(root)
    _check_one_scale(root, files)
    started: dict[str, list[int]] = {}
    for _, data, complete in files:
        if not complete:
            started.setdefault(data["cell"], []).append(data["seed"])
    configs = [get_path(data, ("config", "scale")) for _, data, complete in sorted(files, key=lambda f: not f[2])]
    config = next((c for c in configs if isinstance(c, dict)), None)
    return ScaleRuns(str(root), _group([f for f in files if f[2]]), started, config)
