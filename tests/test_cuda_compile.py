"""Compile-check of the CUDA sources (csrc/cuda/*.cu) with nvcc, on machines without a GPU.

The CPU torch wheel ships the c10/cuda headers but not c10/cuda/impl/cuda_cmake_macros.h (generated
by CUDA builds), so a shim directory provides it. Both files compile in parallel (host + device code
for sm_90, -O0 to keep it short); a success is cached under the temp directory by a hash of the
sources, the torch headers' version and the flags, so re-runs with unchanged sources are instant.
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


def _key(src: Path) -> str:
    h = hashlib.sha256()
    h.update(src.read_bytes())
    for dep in sorted((ROOT / "csrc").glob("*.h")):
        h.update(dep.read_bytes())
    h.update(torch.__version__.encode())
    h.update(" ".join(FLAGS).encode())
    return h.hexdigest()[:24]


def test_cuda_sources_compile():
    assert SOURCES, "no CUDA sources found"
    cache = Path(tempfile.gettempdir()) / "jsigr_fast_nvcc_ok"
    cache.mkdir(exist_ok=True)
    todo = [s for s in SOURCES if not (cache / _key(s)).exists()]
    if not todo:
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        incs = ["-I", str(_shim(tmp))]
        for p in include_paths() + [sysconfig.get_paths()["include"]]:
            incs += ["-isystem", p]
        procs = [(s, subprocess.Popen([NVCC, *FLAGS, *incs, "-c", str(s), "-o", str(tmp / (s.stem + ".o"))],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)) for s in todo]
        failures = []
        for s, p in procs:
            out, _ = p.communicate(timeout=600)
            if p.returncode != 0:
                failures.append(f"--- {s.name} (exit {p.returncode}):\n{out[-4000:]}")
            else:
                (cache / _key(s)).write_text("ok\n")
    assert not failures, "\n".join(failures)
