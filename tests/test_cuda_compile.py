"""Compile-check of the CUDA sources (csrc/cuda/*.cu) with nvcc, on machines without a GPU.

The CPU torch wheel ships the c10/cuda headers but not c10/cuda/impl/cuda_cmake_macros.h (generated
by CUDA builds), so a shim directory provides it. The files compile in parallel (host + device code
for sm_90, -O0 to keep it short); a success is cached under the temp directory by a hash of the
sources, the torch headers' version and the flags, so re-runs with unchanged sources are instant.
The loss head's device code is also compiled to PTX with setup.py's optimisation flags
(-O3 --use_fast_math), which would silently turn expf / logf into approximations.
"""
import hashlib
import os
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)
if NVCC and not os.path.exists(NVCC):
    NVCC = None

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit on PATH or in CUDA_HOME)")

FLAGS = ["-std=c++20", "-O0", "-Xptxas", "-O0", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
         "-gencode", "arch=compute_90,code=sm_90", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "-DTORCH_EXTENSION_NAME=_C",
         "-DTORCH_API_INCLUDE_EXTENSION_H"]


def _shim(tmp: Path) -> Path:
    d = tmp / "shim"
    (d / "c10" / "cuda" / "impl").mkdir(parents=True, exist_ok=True)
    (d / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return d


def _key(src: Path, flags=FLAGS) -> str:
    h = hashlib.sha256()
    h.update(src.read_bytes())
    for dep in sorted((ROOT / "csrc").glob("*.h")):
        h.update(dep.read_bytes())
    h.update(torch.__version__.encode())
    h.update(" ".join(flags).encode())
    return h.hexdigest()[:24]


def _includes(tmp: Path) -> list:
    incs = ["-I", str(_shim(tmp))]
    for p in include_paths() + [sysconfig.get_paths()["include"]]:
        incs += ["-isystem", p]
    return incs


def test_cuda_sources_compile():
    assert SOURCES, "no CUDA sources found"
    cache = Path(tempfile.gettempdir()) / "jsigr_fast_nvcc_ok"
    cache.mkdir(exist_ok=True)
    todo = [s for s in SOURCES if not (cache / _key(s)).exists()]
    if not todo:
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        incs = _includes(tmp)
        procs = [(s, subprocess.Popen([NVCC, *FLAGS, *incs, "-c", str(s), "-o", str(tmp / (s.stem + ".o"))],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)) for s in todo]
        failures = []
        for s, p in procs:
            out, _ = p.communicate(timeout=600)
            if p.returncode != 0:
                failures.append(f"--- {s.name} (exit {p.returncode}):\n{out[-4000:]}")
            elif missing := _unresolved_torch_symbols(tmp / (s.stem + ".o")):
                failures.append(f"--- {s.name}: references ATen/c10 symbols libtorch does not export (the "
                                f"extension would fail to load):\n" + "\n".join(missing))
            else:
                (cache / _key(s)).write_text("ok\n")
    assert not failures, "\n".join(failures)


def _exported(lib: Path) -> set:
    r = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True)
    return {line.split()[-1] for line in r.stdout.splitlines() if line.strip()}


def _unresolved_torch_symbols(obj: Path) -> list:
    """The at:: / c10:: symbols an object needs that the torch libraries do not define. Compiling is
    not linking: `t.data_ptr<long long>()` compiles, but libtorch instantiates data_ptr only for its
    scalar types (int64_t is long on Linux), so the built extension fails to load on the GPU machine.
    c10::cuda / at::cuda symbols are skipped: they live in the CUDA libraries a CPU wheel lacks."""
    if shutil.which("nm") is None:
        return []
    lib = Path(torch.__file__).parent / "lib"
    exported = set()
    for name in ("libtorch_cpu.so", "libc10.so", "libtorch.so", "libtorch_python.so"):
        if (lib / name).exists():
            exported |= _exported(lib / name)
    r = subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True, check=True)
    needed = [line.split()[-1] for line in r.stdout.splitlines() if line.strip()]
    torch_ns = ("_ZN2at", "_ZNK2at", "_ZN3c10", "_ZNK3c10")
    cuda_ns = ("_ZN2at4cuda", "_ZNK2at4cuda", "_ZN3c104cuda", "_ZNK3c104cuda")
    missing = [sym for sym in needed if sym.startswith(torch_ns) and not sym.startswith(cuda_ns) and sym not in exported]
    if missing:
        demangled = subprocess.run(["c++filt"], input="\n".join(missing), capture_output=True, text=True).stdout
        return demangled.splitlines() or missing
    return missing


# setup.py's nvcc optimisation flags, with the device-only flags of FLAGS
BUILD_FLAGS = ["-std=c++20", "-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-arch=sm_90"] + \
    [f for f in FLAGS if f.startswith("-D")]


def test_loss_head_exp_and_log_stay_accurate_under_fast_math():
    """--use_fast_math maps expf / logf to __expf / __logf (ex2.approx / lg2.approx, error growing
    with |x|); csrc/cuda/cross_entropy_cotangent.cu takes them in double precision instead, which
    the flag leaves alone. The PTX of the build's flags must contain no approximate exp2 / log2."""
    src = ROOT / "csrc" / "cuda" / "cross_entropy_cotangent.cu"
    cache = Path(tempfile.gettempdir()) / "jsigr_fast_nvcc_ok"
    cache.mkdir(exist_ok=True)
    done = cache / ("ptx-" + _key(src, BUILD_FLAGS))
    if done.exists():
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        out = tmp / "loss_head.ptx"
        r = subprocess.run([NVCC, *BUILD_FLAGS, *_includes(tmp), "-ptx", str(src), "-o", str(out)],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        ptx = out.read_text()
    assert ptx.count(".entry") == 8, "expected forward and backward kernels for 4 dtypes"
    assert "ex2.approx" not in ptx and "lg2.approx" not in ptx
    done.write_text("ok\n")
