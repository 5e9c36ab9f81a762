"""One thundersvm or cuML fit in a fresh interpreter, killed at a time limit.

Neither library can run in a child forked from a typical parent: thundersvm's OpenMP hangs when the parent's
OpenMP pool (e.g. torch's) is running, and CUDA does not survive a fork. A "spawn" child re-imports the
caller's main module, which fails in scripts without an ``if __name__ == "__main__"`` guard. So ``run`` starts
this file as a script (it imports only numpy and the SVM library), passes the data through .npy files in a
temporary folder, and kills the process at the time limit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def run(
    library: str, X: np.ndarray, y: np.ndarray, C: float, tol: float, max_iter: int | None, time_limit: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Fit ``library``'s SVC ("thundersvm": linear kernel on features X; "cuml": precomputed kernel X).

    Returns (support indices, |dual coefficients|). Raises TimeoutError past ``time_limit`` seconds and
    RuntimeError (with the worker's stderr) when the worker fails.
    """
    with tempfile.TemporaryDirectory(prefix="afterkernel-svm-") as folder:
        tmp = Path(folder)
        np.save(tmp / "X.npy", X)
        np.save(tmp / "y.npy", y)
        (tmp / "params.json").write_text(json.dumps({"library": library, "C": C, "tol": tol, "max_iter": max_iter}))
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), folder],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _, stderr = proc.communicate(timeout=time_limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise TimeoutError(f"no result within time_limit={time_limit:g} s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"the {library} worker failed (exit code {proc.returncode}):\n{stderr[-4000:]}")
        return np.load(tmp / "support.npy"), np.load(tmp / "coef.npy")


def _main(folder: str) -> None:
    tmp = Path(folder)
    params = json.loads((tmp / "params.json").read_text())
    X, y = np.load(tmp / "X.npy"), np.load(tmp / "y.npy")
    max_iter = -1 if params["max_iter"] is None else params["max_iter"]
    if params["library"] == "thundersvm":
        from thundersvm import SVC

        svc = SVC(kernel="linear", C=params["C"], tol=params["tol"], max_iter=max_iter)
    else:
        from cuml.svm import SVC

        svc = SVC(kernel="precomputed", C=params["C"], tol=params["tol"], max_iter=max_iter, output_type="numpy")
    svc.fit(X, y)
    np.save(tmp / "support.npy", np.asarray(svc.support_, dtype=np.intp))
    np.save(tmp / "coef.npy", np.abs(np.asarray(svc.dual_coef_, dtype=np.float64).ravel()))


if __name__ == "__main__":
    _main(sys.argv[1])
