#!/usr/bin/env bash
# Everything the first GPU session owes the open issues, in stages that each fit one 10-minute
# device call (see ../.library/device/README.md: 10 min per command, 30 min per session). Run from
# the repository root on the GPU machine, with the machine's own torch (no network there, so no
# venv / pip downloads: the extension is built in place against the installed torch):
#
#   bash bench/gpu_session.sh build    # build the extension with nvcc + the CUDA/GPU tests    (~5 min)
#   bash bench/gpu_session.sh step     # fused vs reference steps, BN/VJP/probes/loss-head/mask (~8 min)
#   bash bench/gpu_session.sh memory   # peak memory vs the standard step (R20, R18), fd accuracy (~2 min)
#   bash bench/gpu_session.sh epoch    # Table-4 epoch bench (CIFAR ResNet-20) + ImageNet R18 throughput
#   bash bench/gpu_session.sh graphs   # whole steps as CUDA graphs: GPU tests, eager vs graphed (~5 min)
#
# What comes back. The device tool returns at most 8 files from $OUT, so each stage writes its logs
# and benchmark records to a scratch folder and leaves in $OUT only: gpu_<stage>.tar.gz (everything),
# gpu_<stage>_summary.md (the records' tables and the failures, to read at once) and versions.txt.
# Unpack the tarball into bench/results/ and commit the records with the conditions they carry.
#
# Carrying the build. A machine is given back 30 s after a call, so a later stage usually starts on
# a fresh one and would rebuild (minutes of device time). The build stage therefore also returns the
# built extension and a hash of the sources it was built from (_C*.so, sources.sha). Copy both into
# .gpu_build/ (git-ignored) and name it in the next calls' carry: ensure_built uses it when the hash
# still matches csrc/, and rebuilds otherwise:
#
#   device run  "bash bench/gpu_session.sh build"
#   mkdir -p .gpu_build && cp <files_at>/_C*.so <files_at>/sources.sha .gpu_build/
#   device run  "bash bench/gpu_session.sh step"   carry=[".gpu_build"]
#
# Each stage keeps going after a failure (so one broken bench does not cost the others) and lists
# what failed at the end.
#
# Nothing is lost to the device's 10-minute limit. The stage has a budget (STAGE_BUDGET_S, default
# 540 s) that each command runs under (`timeout`, SIGINT first): a command that would overrun it is
# stopped, and the commands after it are skipped, so the stage ends and packs its results itself.
# $OUT is also repacked after every command, so even a call killed from outside returns what had
# finished. The summary lists each command's seconds (timings.txt): the costs of the next session's plan.
set -uo pipefail
stage="${1:-}"
OUT="${OUT:-bench/results/gpu}"
RES="$(mktemp -d)/$stage"  # the full results of this stage; packed into $OUT after every command
mkdir -p "$OUT" "$RES"
PY="${PYTHON:-python3}"
# the package from this checkout (nothing is pip-installed there): the bench scripts import jsigr_fast
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BUDGET="${STAGE_BUDGET_S:-540}"
START=$SECONDS
failed=()
skipped=()
run() {  # run <log name> <command...>: tee into $RES/<name>.log under the budget, remember failures
  local name="$1"; shift
  local left=$((BUDGET - (SECONDS - START))) t0=$SECONDS
  if ((left < 15)); then
    echo "== $name: skipped, the stage's ${BUDGET} s budget is spent"; skipped+=("$name"); pack; return
  fi
  echo "== $name: $*"
  if declare -F "$1" >/dev/null; then  # a function of this script (ensure_built): no timeout wrapper
    "$@" 2>&1 | tee "$RES/$name.log"
  else
    timeout --signal=INT --kill-after=15 "$left" "$@" 2>&1 | tee "$RES/$name.log"
  fi
  local rc=${PIPESTATUS[0]}
  if ((rc == 124)); then echo "== $name: stopped after ${left} s (the stage's budget)" | tee -a "$RES/$name.log"; fi
  if ((rc != 0)); then failed+=("$name"); fi
  echo "$name $((SECONDS - t0)) s (exit $rc)" >> "$RES/timings.txt"
  pack
}
versions() {
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
    nvcc --version 2>/dev/null | tail -1
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| cudnn', torch.backends.cudnn.version())"
    "$PY" -c "import triton; print('triton', triton.__version__)" 2>/dev/null
    git rev-parse HEAD 2>/dev/null
  } > "$RES/versions.txt"
  cat "$RES/versions.txt"
}
sources_sha() {  # what the extension is built from
  cat setup.py csrc/*.h csrc/*.cpp csrc/cuda/*.cu | sha256sum | cut -c1-32
}
has_cuda_build() {
  "$PY" -c "import torch, jsigr_fast as j, sys; sys.exit(0 if j.extension_loaded() and torch.ops.jsigr_fast.masked_sq_norm.default.has_kernel_for_dispatch_key('CUDA') else 1)" 2>/dev/null
}
importable_kernels() {  # a source checkout (no pip install): the Triton kernels are installed as jsigr_fast.kernels
  [ -e jsigr_fast/kernels ] || ln -s ../kernels jsigr_fast/kernels
}
ensure_built() {  # a carried build of these very sources, else the in-place build (ninja: incremental)
  importable_kernels
  if [ -f .gpu_build/sources.sha ] && [ "$(cat .gpu_build/sources.sha)" = "$(sources_sha)" ]; then
    cp .gpu_build/_C*.so jsigr_fast/ && has_cuda_build && error_path_ok &&
      { echo "using the carried build (.gpu_build)"; return 0; }
  fi
  MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace || return 1
  # Seen on this workplace's H200 image (2026-11-23): its CC/CXX (/opt/gcc/bin/g++, a wrapper script) build
  # extensions that segfault formatting their first error message (TORCH_CHECK with a number: libstdc++'s
  # ostream code linked into the .so; a bare load_inline extension crashed the same way), while every
  # computation is right. /usr/bin/g++ builds a working one: rebuild with it when the error path crashes.
  if ! error_path_ok && [ -x /usr/bin/g++ ]; then
    echo "the extension crashed raising an error: rebuilding with /usr/bin/gcc, /usr/bin/g++"
    rm -rf build
    CC=/usr/bin/gcc CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++ MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext \
      --inplace || return 1
    error_path_ok || { echo "the error path still crashes"; return 1; }
  fi
}
error_path_ok() {  # a bad argument raises a RuntimeError instead of killing the process (the check's build row)
  "$PY" -c "import sys; from jsigr_fast.selfcheck import error_path_results as e; sys.exit(not e(['cpu'])[0].passed)"
}
pack() {  # the <= 8 files that come back
  {
    echo "# GPU session, stage $stage"
    echo '```'; cat "$RES/versions.txt" 2>/dev/null; echo '```'
    if ((${#failed[@]})); then echo "FAILED: ${failed[*]}"; else echo "nothing failed"; fi
    if ((${#skipped[@]})); then echo "SKIPPED (budget spent): ${skipped[*]}"; fi
    echo; echo "## seconds per command"; echo '```'; cat "$RES/timings.txt" 2>/dev/null; echo '```'
    echo; echo "## last lines of each log"
    for f in "$RES"/*.log; do [ -f "$f" ] && { echo "### $(basename "$f")"; echo '```'; tail -n 4 "$f"; echo '```'; }; done
    for f in "$RES"/*.md; do [ -f "$f" ] && { echo; echo "## $(basename "$f")"; cat "$f"; }; done
  } > "$OUT/gpu_${stage}_summary.md.tmp"
  mv "$OUT/gpu_${stage}_summary.md.tmp" "$OUT/gpu_${stage}_summary.md"
  cp "$RES/versions.txt" "$OUT/" 2>/dev/null
  # renamed into place: a call killed mid-pack still returns the previous, whole tarball
  tar czf "$OUT/gpu_${stage}.tar.gz.tmp" -C "$RES" . && mv "$OUT/gpu_${stage}.tar.gz.tmp" "$OUT/gpu_${stage}.tar.gz"
}

case "$stage" in
  build)
    versions
    run build ensure_built
    if has_cuda_build; then  # returned, so later calls can carry it (see the header)
      # without its debug sections: the -O2 -g host objects make it ~24 MB, over the tool's 16 MiB per file
      cp jsigr_fast/_C*.so "$OUT/" && strip --strip-debug "$OUT"/_C*.so && sources_sha > "$OUT/sources.sha"
    fi
    run import "$PY" -c "import jsigr_fast, torch; print('extension', jsigr_fast.extension_loaded(), jsigr_fast.extension_error()); print('backends', jsigr_fast.available_backends('cuda'))"
    # the install self-check (fused vs reference in float64 / float32 / bf16, compiled CUDA and Triton
    # kernels), then every test that needs CUDA, then the fused-backend and op tests on this machine
    run check "$PY" -m jsigr_fast check --device cuda --json "$RES/check_cuda.json"
    run test_gpu "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs
    # one process per file: a crash in one (a segfault ends pytest) does not hide the others' results
    run test_bn_ops "$PY" -m pytest -q -p no:cacheprovider tests/test_bn_ops.py -rs
    run test_mask_ops "$PY" -m pytest -q -p no:cacheprovider tests/test_mask_ops.py -rs
    run test_loss_head "$PY" -m pytest -q -p no:cacheprovider tests/test_loss_head.py -rs
    run test_masked_sq_norm "$PY" -m pytest -q -p no:cacheprovider tests/test_masked_sq_norm.py -rs
    run test_fused_backend "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_backend.py -rs
    ;;
  step)
    versions
    ensure_built >/dev/null
    # the issue's targets first (fused vs reference, then the bandwidth ones): a spent budget skips the rest
    run fused_r20 "$PY" bench/bench_fused.py --device cuda --model resnet20 --batch 128 --dtype float32 \
      --rounds 5 --repeats 5 --profile --ablation fd_kept --ablation fd_rules --ablation bn_rebuild \
      --ablation aten_rules --ablation aten_bn --ablation python_rules --ablation rebuild_torch \
      --ablation recompute --out "$RES"
    run fused_r18 "$PY" bench/bench_fused.py --device cuda --model resnet18 --batch 256 --dtype bfloat16 \
      --channels-last --rounds 3 --repeats 3 --ablation eager --ablation bn_rebuild --ablation aten_rules \
      --ablation aten_bn --ablation python_rules --ablation rebuild_torch --ablation recompute --out "$RES"
    run bn_bw_fp32 "$PY" bench/bench_bn.py --device cuda --dtype float32 --out "$RES"
    run mask_bw "$PY" bench/bench_mask.py --device cuda --out "$RES"
    run bn_bw_bf16 "$PY" bench/bench_bn.py --device cuda --dtype bfloat16 --out "$RES"
    run fused_r20_triton "$PY" bench/bench_fused.py --device cuda --model resnet20 --batch 128 --dtype float32 \
      --pairs jsigr --gpu-kernels triton --rounds 3 --repeats 5 --out "$RES"
    run step_r20 "$PY" bench/bench_step.py --device cuda --model resnet20 --batch 128 --repeats 10 --out "$RES"
    run vjp_r20 "$PY" bench/bench_vjp.py --device cuda --model resnet20 --batch 128 --out "$RES"
    run probes_r20 "$PY" bench/bench_probes.py --device cuda --model resnet20 --batch 128 --out "$RES"
    run loss_head "$PY" bench/bench_loss_head.py --device cuda --out "$RES"
    ;;
  memory)
    versions
    ensure_built >/dev/null
    run memory_r20 "$PY" bench/bench_memory.py --device cuda --out "$RES"
    run memory_r18 "$PY" bench/bench_memory.py --device cuda --model resnet18 --batch 256 --dtype bfloat16 \
      --channels-last --out "$RES"
    run fd_accuracy "$PY" bench/bench_fd_accuracy.py --device cuda --out "$RES"
    run fd_accuracy_gelu "$PY" bench/bench_fd_accuracy.py --device cuda --activation gelu --out "$RES"
    ;;
  epoch)
    versions
    ensure_built >/dev/null
    run epoch_cifar "$PY" bench/bench_epoch.py --preset cifar-gpu --rounds 3 --out "$RES"
    run epoch_imagenet "$PY" bench/bench_epoch.py --preset imagenet-gpu --rounds 2 --out "$RES"
    ;;
  graphs)
    versions
    ensure_built >/dev/null
    # jsigr_fast.graphed_step has never run on a GPU: its tests first (graphed = eager in float64), then
    # eager and graphed steps side by side (a step that cannot be captured shows its error in the table)
    run test_graphs "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py -rs
    run step_r20_graphs "$PY" bench/bench_step.py --device cuda --model resnet20 --batch 128 --repeats 10 \
      --cuda-graph --out "$RES" \
      --methods standard,double_backprop_fused,jsigr,jsigr_fused,jsigr_fd_fused,jsigr_hutchinson_fused,pgd_at7
    run step_r18_graphs "$PY" bench/bench_step.py --device cuda --model resnet18 --batch 256 --dtype bfloat16 \
      --channels-last --repeats 5 --cuda-graph --methods standard,jsigr,jsigr_fused,pgd_at7 --out "$RES"
    # Table 4 with every capturable method graphed (JARN's GAN steps run eagerly, said in its row)
    run epoch_cifar_graphs "$PY" bench/bench_epoch.py --preset cifar-gpu --rounds 3 --cuda-graph --out "$RES"
    ;;
  selftest)  # the machinery above, for tests/test_gpu_session_script.py (no GPU, nothing built)
    run ok true
    run fails false
    run slow sleep 60
    run after_budget true
    ;;
  *)
    echo "usage: bash bench/gpu_session.sh build|step|memory|epoch|graphs   (results in \$OUT, default bench/results/gpu)" >&2
    exit 2
    ;;
esac
pack
if ((${#skipped[@]})); then echo "SKIPPED (budget spent): ${skipped[*]}"; fi
if ((${#failed[@]})); then echo "FAILED: ${failed[*]} (logs in $OUT/gpu_${stage}.tar.gz)"; exit 1; fi
echo "all of stage '$stage' ran; results in $OUT/gpu_${stage}.tar.gz"
