"""What the tests/test_triton_*.py files share: running their checks in a ``TRITON_INTERPRET=1`` child
process, and compiling a kernel to PTX for sm_90 without a GPU (for what the interpreter cannot
check: it accepts code the compiler rejects, e.g. non-constexpr globals, and says nothing about the
instructions chosen).

TRITON_INTERPRET must be set before triton is first imported, and other test modules may import it
(torch.compile does), so each file's kernel checks are marked ``child_only`` and run in a child pytest
process that its parent-only driver starts with :func:`run_in_interpreter`.
"""
import os
import subprocess
import sys
from importlib.util import find_spec

import pytest

CHILD = os.environ.get("JSIGR_TRITON_CHILD") == "1"
child_only = pytest.mark.skipif(not CHILD, reason="runs in the TRITON_INTERPRET=1 child process")


def _marked(*marks):
    def apply(fn):
        for m in reversed(marks):
            fn = m(fn)
        return fn
    return apply


def nvidia_backend() -> bool:
    """True when Triton is installed with its NVIDIA backend (it compiles without a GPU)."""
    if find_spec("triton") is None:
        return False
    from triton.backends import backends

    return "nvidia" in backends


# the driver that starts the child (parent only, where Triton is installed)
parent_driver = _marked(pytest.mark.skipif(CHILD, reason="parent driver"),
                        pytest.mark.skipif(find_spec("triton") is None, reason="triton is not installed"))
# a PTX compile test (parent only: the interpreter does not compile)
ptx_test = _marked(pytest.mark.skipif(CHILD, reason="parent only (the interpreter does not compile)"),
                   pytest.mark.skipif(not nvidia_backend(), reason="triton without its NVIDIA backend"),
                   pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION:UserWarning"))


def run_in_interpreter(path: str, passed: int, skipped: int) -> None:
    """Run the test file ``path`` under TRITON_INTERPRET=1 and require exactly ``passed`` passed and
    ``skipped`` skipped tests there (the child tests must really run; the skips are the parent-only ones)."""
    env = dict(os.environ, TRITON_INTERPRET="1", JSIGR_TRITON_CHILD="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert f"{passed} passed, {skipped} skipped" in r.stdout, r.stdout[-2000:]


def ptx(fn, signature: dict, constexprs: dict) -> str:
    """The PTX of ``fn`` for sm_90: ``signature`` maps the runtime arguments to Triton types ("*fp32",
    "i32", ...), ``constexprs`` the compile-time ones to their values."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
