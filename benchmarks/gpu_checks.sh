#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one run, for a session that is lent an H100/H200.
#
# A device session has 15 minutes of GPU time in all (start-up included), so the checks are prepared here
# and run there once, each step under its own time limit (one slow step cannot take the others down):
#
#   here, once:     bash benchmarks/gpu_checks.sh --stage     # copies the MNIST files into .gpu_data/ (git-ignored)
#   on the device:  run(command="bash benchmarks/gpu_checks.sh", carry=[".gpu_data"], timeout_s=560)
#   here, no GPU:   SMOKE=1 DEVICE=cpu bash benchmarks/gpu_checks.sh   # the same steps at toy sizes (~3 min)
#
# Steps (outputs in $OUT, default ./gpu_out): env.txt (card, driver, versions); pytest_gpu.txt (the tests marked
# gpu); entk.txt/.json (engine vs the tutorial's Jacobian contraction on the card at n = 2,000 MLP / 1,000 VGG,
# CIFAR-10 shapes, and the issue's target: the full MNIST 3-vs-8 split, K_train 11,982^2 + K_test 1,984 x 11,982,
# time and peak memory); svm.txt (the hard-margin SVM at n = 11,982 on the card, `auto` and `torch`, beside plain
# scikit-learn on the CPU). The device image has torch, pytorch-lightning, scikit-learn and scipy; the package
# is used from the working tree (PYTHONPATH), nothing is installed.
set -u
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--stage" ]; then
    mkdir -p .gpu_data/mnist/MNIST/raw
    cp ../shared/data/mnist/MNIST/raw/*.gz .gpu_data/mnist/MNIST/raw/  # 12 MB; .gitignore keeps it out of git
    du -sh .gpu_data
    exit 0
fi

OUT=${OUT:-gpu_out}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 AFTERKERNEL_DATA="$PWD/.gpu_data"

if [ -n "${SMOKE:-}" ]; then
    ENTK_ARGS=(--compare-n 200 100 --cifar-n 50 --reference-n 50 --repeats 1)
    SVM_ARGS=(--sizes 300 --models mlp --repeats 1)
else
    ENTK_ARGS=(--compare-n 2000 1000 --cifar-n 500 --reference-n 300 --full-split .gpu_data)
    SVM_ARGS=(--sizes 11982)
fi

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, output to $OUT/NAME.txt, print its tail
    local name=$1 limit=$2 start rc
    shift 2
    echo "== $name (limit ${limit} s)"
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    rc=$?
    echo "   exit $rc after $(($(date +%s) - start)) s"
    tail -n 12 "$OUT/$name.txt"
}

step env 60 bash -c "nvidia-smi 2>&1 | head -15; $PY -c 'import torch, sklearn, scipy, pytorch_lightning as pl; \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() \
else \"no GPU\"); print(\"scikit-learn\", sklearn.__version__, \"scipy\", scipy.__version__, \"lightning\", pl.__version__)'"
step pytest_gpu 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
step entk 240 "$PY" benchmarks/entk.py --device "$DEVICE" "${ENTK_ARGS[@]}" --json "$OUT/entk.json"
step svm 150 "$PY" benchmarks/svm.py "${SVM_ARGS[@]}" --kinds after initial --device "$DEVICE" --solver-device "$DEVICE" \
    --backends auto torch
echo "== done: $(ls "$OUT" | tr '\n' ' ')"
