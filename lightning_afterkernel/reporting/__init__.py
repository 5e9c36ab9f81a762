"""Top layer: the paper-grid runner (:func:`run_grid`) and the reproduction report (:func:`write_report`)."""

from lightning_afterkernel.reporting.grid import SCALES, Cell, Scale, grid_cells, run_grid
from lightning_afterkernel.reporting.report import judge_claims, load_runs, write_report

__all__ = ["SCALES", "Cell", "Scale", "grid_cells", "judge_claims", "load_runs", "run_grid", "write_report"]
