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
# Steps (outputs in $OUT, default ./gpu_out), the issue targets first: env.txt (card, driver, versions);
# entk.txt/.json (the issue's target: the full MNIST 3-vs-8 split, K_train 11,982^2 + K_test 1,984 x 11,982, time
# and peak memory, the tutorial's Jacobian contraction on the same inputs once, a profile of a run over its
# target; then engine vs tutorial on the card at n = 2,000 MLP / 1,000 VGG and CIFAR-10 shapes); svm.txt (the
# hard-margin SVM at n = 11,982 on the card, `auto`, beside plain scikit-learn on the CPU); pytest_gpu.txt (the
# tests marked gpu, from the files that hold them: the device image has no wandb or jsonargparse). The image has
# torch, pytorch-lightning, torchvision, scikit-learn and scipy; the package is used from the working tree
# (PYTHONPATH), nothing is installed. Then full_run_vgg/mlp.txt (the paper's full run through a Trainer with the
# callback, benchmarks/full_run.py) and diagnose.txt (benchmarks/gpu_diagnose.py: the float32 VGG kernel's error
# on real MNIST, broken down: by route, factors or products, and on random images; 41 s on an H200): 8 files, the
# most a device call returns. Step limits add up to 830 s; on an H200 (2026-11-28) the steps but the last took
# 270 s in all. A session with less device time runs a subset, e.g. STEPS="entk pytest_gpu diagnose" bash
# benchmarks/gpu_checks.sh (about 2.5 min of command time).
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

ENTK_ARGS=(--full-split .gpu_data --full-split-tutorial --profile)
if [ -n "${SMOKE:-}" ]; then
    ENTK_ARGS+=(--full-split-limit 300 --compare-n 200 100 --cifar-n 50 --reference-n 50 --repeats 1)
    SVM_ARGS=(--sizes 300 --models mlp --repeats 1)
    RUN_ARGS=(--n-train 300 --n-test 100 --n-invariance 50)
    export DIAGNOSE_SIZES=400
else
    RUN_ARGS=()
    ENTK_ARGS+=(--compare-n 2000 1000 --cifar-n 500 --reference-n 300)
    SVM_ARGS=(--sizes 11982)
fi
GPU_TESTS=(tests/kernels/test_engine.py tests/kernels/test_empirical.py tests/kernels/test_layouts.py tests/svm/test_torch_backend.py
    tests/svm/test_optional_backends.py tests/callbacks/test_after_kernel.py)

STEPS=${STEPS:-env entk svm full_run_vgg pytest_gpu full_run_mlp diagnose}  # a subset reruns only those steps

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, output to $OUT/NAME.txt, print its tail
    local name=$1 limit=$2 start rc
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name (limit ${limit} s)"
    start=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    rc=$?
    echo "   exit $rc after $(($(date +%s) - start)) s"
    tail -n 12 "$OUT/$name.txt"
}

step env 30 bash -c "nvidia-smi 2>&1 | head -15; $PY -c 'import torch, sklearn, scipy, pytorch_lightning as pl; \
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() \
else \"no GPU\"); print(\"scikit-learn\", sklearn.__version__, \"scipy\", scipy.__version__, \"lightning\", pl.__version__)'"
step entk 180 "$PY" benchmarks/entk.py --device "$DEVICE" "${ENTK_ARGS[@]}" --json "$OUT/entk.json"
step svm 150 "$PY" benchmarks/svm.py "${SVM_ARGS[@]}" --kinds after initial --device "$DEVICE" --solver-device "$DEVICE" \
    --backends auto
step full_run_vgg 150 "$PY" benchmarks/full_run.py --model vgg --accelerator "${DEVICE/cuda/gpu}" --data .gpu_data \
    --out /tmp/full_run_vgg "${RUN_ARGS[@]}"
step pytest_gpu 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}"
step full_run_mlp 100 "$PY" benchmarks/full_run.py --model mlp --accelerator "${DEVICE/cuda/gpu}" --data .gpu_data \
    --out /tmp/full_run_mlp "${RUN_ARGS[@]}"
step diagnose 120 "$PY" benchmarks/gpu_diagnose.py .gpu_data "$DEVICE" "${DIAGNOSE_SIZES:-2000,6000}"
echo "== done: $(ls "$OUT" | tr '\n' ' ')"
