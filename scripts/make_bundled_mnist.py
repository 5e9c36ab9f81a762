"""Rebuild ``lightning_afterkernel/data/bundled/mnist_3v8.npz``: a seeded random subset of MNIST 3s and 8s.

    python scripts/make_bundled_mnist.py [--root ../shared/data] [--seed 0] [--n-train 2000] [--n-test 500]

The official gz files are checked against their md5 first. One ``numpy.random.default_rng(seed)``
draws the train positions, then the test positions, without replacement among the 3s and 8s of each
official split (so the class balance is as it falls); positions are stored sorted. The npz zip
timestamps differ between runs, so reproducibility is checked on the printed content sha256 instead
of the file's md5.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

from lightning_afterkernel.data.sources import BUNDLED_MNIST, load_split

REPO_ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
DIGITS = (3, 8)


def check_md5(raw: Path) -> None:
    """Stop unless every official gz file under ``raw`` has its published md5."""
    for name, md5 in OFFICIAL_MD5.items():
        got = hashlib.md5((raw / name).read_bytes()).hexdigest()
        if got != md5:
            raise SystemExit(f"{raw / name}: md5 {got}, expected the official {md5}")


def content_sha256(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over the arrays' bytes in key order (stable across runs, unlike the zip file)."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--out", type=Path, default=BUNDLED_MNIST)
    args = parser.parse_args()

    check_md5(args.root / "mnist" / "MNIST" / "raw")
    rng = np.random.default_rng(args.seed)
    arrays = {}
    for split, train, n in (("train", True, args.n_train), ("test", False, args.n_test)):
        images, labels = load_split("mnist", args.root, train=train)
        candidates = np.flatnonzero(np.isin(labels, DIGITS))
        picked = np.sort(rng.choice(candidates, size=n, replace=False)).astype(np.int64)
        arrays[f"x_{split}"] = images[picked, :, :, 0]
        arrays[f"y_{split}"] = labels[picked]
        arrays[f"{split}_indices"] = picked
        counts = {d: int((labels[picked] == d).sum()) for d in DIGITS}
        print(f"{split}: {n} of {len(candidates)} threes and eights; per digit {counts}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {args.out.stat().st_size} bytes, content sha256 {content_sha256(arrays)}")


if __name__ == "__main__":
    main()
