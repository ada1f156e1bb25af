#!/usr/bin/env bash
# Everything the first GPU session owes the open issues, in stages that each fit one 10-minute
# device call (see ../.library/device/README.md: 10 min per command, 30 min per session). Run from
# the repository root on the GPU machine, with the machine's own torch (no network there, so no
# venv / pip downloads: the extension is built in place against the installed torch):
#
#   bash bench/gpu_session.sh build    # build the extension with nvcc + the CUDA/GPU tests    (~5 min)
#   bash bench/gpu_session.sh step     # fused vs reference steps, BN/VJP/loss-head kernels     (~8 min)
#   bash bench/gpu_session.sh epoch    # Table-4 epoch bench (CIFAR ResNet-20) + ImageNet R18 throughput
#
# Results go to $OUT (the device tool copies that folder back; default bench/results/gpu) with a
# versions file; commit them under bench/results/ with the conditions they carry. Each stage keeps
# going after a failure (so one broken bench does not cost the others) and lists what failed at the end.
set -uo pipefail
stage="${1:-}"
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
failed=()
run() {  # run <log name> <command...>: tee into $OUT/<name>.log, remember failures
  local name="$1"; shift
  echo "== $name: $*"
  if ! "$@" 2>&1 | tee "$OUT/$name.log"; then failed+=("$name"); fi
}
versions() {
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
    nvcc --version 2>/dev/null | tail -1
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| cudnn', torch.backends.cudnn.version())"
    "$PY" -c "import triton; print('triton', triton.__version__)" 2>/dev/null
    git rev-parse HEAD 2>/dev/null
  } > "$OUT/versions.txt"
  cat "$OUT/versions.txt"
}
ensure_built() {  # the in-place build (ninja is incremental: a no-op when already built)
  "$PY" -c "import torch, jsigr_fast as j, sys; sys.exit(0 if j.extension_loaded() and torch.ops.jsigr_fast.masked_sq_norm.default.has_kernel_for_dispatch_key('CUDA') else 1)" 2>/dev/null \
    || MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace
}

case "$stage" in
  build)
    versions
    run build ensure_built
    run import "$PY" -c "import jsigr_fast, torch; print('extension', jsigr_fast.extension_loaded(), jsigr_fast.extension_error()); print('backends', jsigr_fast.available_backends('cuda'))"
    # every test that needs CUDA, then the fused-backend and op tests on this machine
    run test_gpu "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs
    run test_ops "$PY" -m pytest -q -p no:cacheprovider -x tests/test_bn_ops.py tests/test_mask_ops.py \
      tests/test_loss_head.py tests/test_masked_sq_norm.py tests/test_fused_backend.py -rs
    ;;
  step)
    versions
    ensure_built >/dev/null
    run bn_bw_fp32 "$PY" bench/bench_bn.py --device cuda --dtype float32 --out "$OUT"
    run bn_bw_bf16 "$PY" bench/bench_bn.py --device cuda --dtype bfloat16 --out "$OUT"
    run fused_r20 "$PY" bench/bench_fused.py --device cuda --model resnet20 --batch 128 --dtype float32 \
      --rounds 5 --repeats 5 --profile --out "$OUT"
    run fused_r18 "$PY" bench/bench_fused.py --device cuda --model resnet18 --batch 256 --dtype bfloat16 \
      --channels-last --rounds 3 --repeats 3 --out "$OUT"
    run step_r20 "$PY" bench/bench_step.py --device cuda --model resnet20 --batch 128 --repeats 10 --out "$OUT"
    run vjp_r20 "$PY" bench/bench_vjp.py --device cuda --model resnet20 --batch 128 --out "$OUT"
    run loss_head "$PY" bench/bench_loss_head.py --device cuda --out "$OUT"
    run mask_bw "$PY" bench/bench_mask.py --device cuda --out "$OUT"
    ;;
  epoch)
    versions
    ensure_built >/dev/null
    run epoch_cifar "$PY" bench/bench_epoch.py --preset cifar-gpu --rounds 3 --out "$OUT"
    run epoch_imagenet "$PY" bench/bench_epoch.py --preset imagenet-gpu --rounds 2 --out "$OUT"
    ;;
  *)
    echo "usage: bash bench/gpu_session.sh build|step|epoch   (results in \$OUT, default bench/results/gpu)" >&2
    exit 2
    ;;
esac
if ((${#failed[@]})); then echo "FAILED: ${failed[*]} (logs in $OUT)"; exit 1; fi
echo "all of stage '$stage' ran; results in $OUT"
