"""The CUDA kernels of csrc/cuda/ built for the CPU emulator (cuda_emu.h, translate.py).

load() translates every .cu file, compiles them with the op schemas into one shared library (g++ via
torch.utils.cpp_extension, cached by a hash of everything it is built from) and returns
torch.ops.jsigr_fast_cuda_emu: the same ops as torch.ops.jsigr_fast, with the CUDA kernels running on
CPU tensors.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .translate import NAMESPACE, schemas, translate

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent.parent / "csrc"
SOURCES = sorted((CSRC / "cuda").glob("*.cu"))


def unavailable() -> str | None:
    """Why the emulator cannot be built here (None when it can)."""
    if shutil.which("ninja") is None:
        return "ninja not found (torch.utils.cpp_extension needs it)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler"
    return None


def asan() -> bool:
    """JSIGR_CUDA_EMU_ASAN=1: build with AddressSanitizer (the process must preload libasan; see
    tests/test_cuda_emulated.py::test_kernels_under_address_sanitizer and asan_preload)."""
    return os.environ.get("JSIGR_CUDA_EMU_ASAN", "") == "1"


def asan_preload() -> str | None:
    """LD_PRELOAD for a process that loads the AddressSanitizer build: the compiler's libasan (it must
    come first) and libstdc++ (Python does not link it, and ASan's __cxa_throw interceptor needs it
    loaded at start-up, or the first C++ exception aborts). None when the compiler has no libasan."""
    import subprocess

    def find(name):
        try:
            path = subprocess.run([os.environ.get("CXX", "c++"), f"-print-file-name={name}"], capture_output=True,
                                  text=True, timeout=60).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
        return os.path.realpath(path) if path and os.path.isabs(path) and os.path.exists(path) else None

    libs = [find("libasan.so"), find("libstdc++.so")]
    return " ".join(libs) if all(libs) else None


def _build(name: str, texts: dict, key_files: list, verbose: bool) -> None:
    """Write the translated sources (only when they changed: ninja rebuilds by time stamp) and
    compile them into one library, cached under the temp directory by a hash of its inputs."""
    h = hashlib.sha256(torch.__version__.encode())
    sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer"] if asan() else []
    h.update(" ".join(sanitize).encode())
    for p in [*key_files, *sorted(CSRC.glob("*.h")), HERE / "cuda_emu.h", HERE / "translate.py"]:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    root = Path(tempfile.gettempdir()) / "jsigr_fast_cuda_emu"
    prefix = f"{name}{'-asan' if sanitize else ''}-"
    build = root / (prefix + h.hexdigest()[:16])
    if root.is_dir():  # builds of older sources (tens of MB each); the length test keeps
        for old in root.glob(prefix + "*"):  # "<name>-asan-<hash>" apart from "<name>-<hash>"
            if old != build and len(old.name) == len(build.name):
                shutil.rmtree(old, ignore_errors=True)
    build.mkdir(parents=True, exist_ok=True)
    files = []
    for fname, text in texts.items():
        out = build / fname
        if not out.exists() or out.read_text() != text:
            out.write_text(text)
        files.append(str(out))
    from torch.utils.cpp_extension import load as cpp_load

    # -O1: the kernels are run at tiny sizes, so build time matters more than speed; C++20 for
    # std::bit_cast. No -ffast-math: the host's IEEE operations stand in for the exact PTX ones.
    cpp_load(name=name, sources=files, build_directory=str(build),
             extra_cflags=["-O1", "-std=c++20", "-g0", "-Wno-unused-function", *sanitize],
             extra_ldflags=sanitize, is_python_module=False, verbose=verbose)


def load(verbose: bool = False):
    """torch.ops.jsigr_fast_cuda_emu: every CUDA kernel of csrc/cuda/, on CPU tensors."""
    texts = {"ops_emu.cpp": schemas(CSRC / "ops.cpp")}
    texts.update({f"{cu.stem}_emu.cpp": translate(cu) for cu in SOURCES})
    _build(NAMESPACE, texts, [*SOURCES, CSRC / "ops.cpp"], verbose)
    return getattr(torch.ops, NAMESPACE)


def load_selftest(verbose: bool = False):
    """torch.ops.emu_selftest.run(case, x): the kernels of selftest.cu, for testing the emulator."""
    cu = HERE / "selftest.cu"
    _build("emu_selftest", {"selftest_emu.cpp": translate(cu, library="emu_selftest", target="emu_selftest")},
           [cu], verbose)
    return torch.ops.emu_selftest


# every op of csrc/ops.cpp that has a CUDA kernel
OPS = ("masked_sq_norm", "masked_sq_norm_backward", "batch_norm_train", "batch_norm_backward",
       "batch_norm_double_backward", "batch_norm_double_backward_from_grad_x", "gradient_saliency_mask",
       "threshold_mask", "adaptor_saliency_mask", "masked_sq_norm_bool", "masked_sq_norm_bool_backward",
       "cross_entropy_cotangent", "cross_entropy_cotangent_backward")


def install_as_cpu_kernels() -> dict:
    """Make the emulated CUDA kernels the CPU kernels of torch.ops.jsigr_fast, for this process, so
    that the library's own code paths (the fused backend, its autograd rules) run on them. Returns a
    dict counting the calls per op (to show the kernels were reached)."""
    import warnings

    import jsigr_fast  # loads jsigr_fast._C first: its CPU kernels, registered later, would win

    if not jsigr_fast.extension_loaded():
        raise RuntimeError(f"the compiled extension is not loaded: {jsigr_fast.extension_error()}")
    E = load()
    calls = {}
    lib = torch.library.Library("jsigr_fast", "IMPL")

    def kernel(name):
        op = getattr(E, name)

        def run(*args):
            calls[name] = calls.get(name, 0) + 1
            return op(*args)

        return run

    with warnings.catch_warnings():  # "overriding a previously registered kernel": the point
        warnings.simplefilter("ignore")
        for name in OPS:
            lib.impl(name, kernel(name), "CPU")
    install_as_cpu_kernels.library = lib  # the registrations last as long as the Library object
    return calls
