"""Compiling a Triton kernel to PTX for sm_90 without a GPU, for the tests/test_triton_*.py checks that
the interpreter cannot make (it accepts code the compiler rejects, e.g. non-constexpr globals, and
says nothing about the instructions chosen)."""
from importlib.util import find_spec


def nvidia_backend() -> bool:
    """True when Triton is installed with its NVIDIA backend (it compiles without a GPU)."""
    if find_spec("triton") is None:
        return False
    from triton.backends import backends

    return "nvidia" in backends


def ptx(fn, signature: dict, constexprs: dict) -> str:
    """The PTX of ``fn`` for sm_90: ``signature`` maps the runtime arguments to Triton types ("*fp32",
    "i32", ...), ``constexprs`` the compile-time ones to their values."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
