"""Rewrite a CUDA source of csrc/cuda/ into host C++ that runs on the CUDA emulator (cuda_emu.h).

Only what the .cu files of this repository use is rewritten, each rewrite counted, and anything the
emulator cannot run is an error that names it (never silently dropped):

  kernel<T...><<<grid, block[, smem[, stream]]>>>(args)  ->  cuda_emu::launch("kernel", grid, block, smem,
                                                              stream, &kernel<T...>, args)
  __shared__ T name[a][b];                               ->  auto& name = cuda_emu::shared_array<T[a][b], id>();
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));   ->  r = a / b;   (and mul/add/sub.rn, setp+selp)
  #include <c10/cuda/...>                                ->  (the emulator's stubs)
  #include "../x.h"                                      ->  #include "<csrc>/x.h"
  t.is_cuda()                                            ->  t.is_cpu()
  TORCH_LIBRARY_IMPL(jsigr_fast, CUDA, m)                ->  TORCH_LIBRARY_IMPL(jsigr_fast_cuda_emu, CPU, m)

Line numbers are kept (every rewrite preserves the newlines it replaces, and a #line directive maps
the output back to the .cu file), so compiler messages and the emulator's "line N" point at the
original source.
"""
from __future__ import annotations

import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMESPACE = "jsigr_fast_cuda_emu"


class TranslationError(RuntimeError):
    pass


def _newlines(text: str) -> str:
    return "\n" * text.count("\n")


def _match_back(src: str, end: int) -> int:
    """Start of the kernel expression ending just before src[end] (identifier with template args)."""
    i = end - 1
    while i >= 0 and src[i].isspace():
        i -= 1
    if src[i] == ">":
        depth = 0
        while i >= 0:
            if src[i] == ">":
                depth += 1
            elif src[i] == "<":
                depth -= 1
                if depth == 0:
                    i -= 1
                    break
            i -= 1
    while i >= 0 and (src[i].isalnum() or src[i] in "_:"):
        i -= 1
    return i + 1


def _match_paren(src: str, start: int) -> int:
    """Index of the ')' closing the '(' at src[start]."""
    assert src[start] == "("
    depth = 0
    for i in range(start, len(src)):
        if src[i] == "(":
            depth += 1
        elif src[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise TranslationError("unbalanced parentheses after a kernel launch")


def _split_top(text: str) -> list[str]:
    """Split at commas outside (), <>, {}, []."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "(<{[":
            depth += 1
        elif ch in ")>}]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _launches(src: str) -> tuple[str, int]:
    out, pos, count = [], 0, 0
    while True:
        lt = src.find("<<<", pos)
        if lt < 0:
            out.append(src[pos:])
            return "".join(out), count
        start = _match_back(src, lt)
        kernel = src[start:lt].strip()
        gt = src.find(">>>", lt)
        if not kernel or gt < 0:
            raise TranslationError(f"cannot parse the kernel launch at offset {lt}: {src[start:lt + 60]!r}")
        config = _split_top(src[lt + 3:gt])
        if not 2 <= len(config) <= 4:
            raise TranslationError(f"launch of {kernel} has {len(config)} configuration arguments")
        config += ["0", "nullptr"][len(config) - 2:]
        p = gt + 3
        while src[p].isspace():
            p += 1
        if src[p] != "(":
            raise TranslationError(f"no argument list after the launch of {kernel}")
        close = _match_paren(src, p)
        args = src[p + 1:close]
        name = re.sub(r"<.*", "", kernel, flags=re.S).split("::")[-1]
        call = f'::cuda_emu::launch("{name}", {", ".join(config)}, &{kernel}'
        call += f", {args})" if args.strip() else ")"
        out += [src[pos:start], call]
        pos = close + 1
        count += 1


_SHARED = re.compile(r"__shared__\s+([A-Za-z_][\w:<>, ]*?)\s+([A-Za-z_]\w*)\s*((?:\[[^\]]+\]\s*)+);")


def _shared(src: str) -> tuple[str, int]:
    n = 0

    def repl(m):
        nonlocal n
        n += 1
        dims = re.sub(r"\s+", "", m.group(3))
        return f"auto& {m.group(2)} = ::cuda_emu::shared_array<{m.group(1)}{dims}, {n}>();" + _newlines(m.group(0))

    return _SHARED.sub(repl, src), n


_ASM = re.compile(r'\basm\s*(?:volatile\s*)?\(\s*((?:"(?:[^"\\]|\\.)*"\s*)+)((?::[^:;]*){1,3})\)\s*;')
_OPERAND = re.compile(r'"[^"]*"\s*\(([^()]*)\)')
_BINARY = {"div": "/", "mul": "*", "add": "+", "sub": "-"}
_COMPARE = {"le": "<=", "lt": "<", "ge": ">=", "gt": ">", "eq": "==", "ne": "!="}


def _asm_statement(template: str, operands: list[str]) -> str:
    t = re.sub(r"\s+", " ", template.replace("\\n", " ").replace("\\t", " ")).strip()
    m = re.fullmatch(r"(div|mul|add|sub)\.rn\.f(32|64) %0, %1, %2;", t)
    if m and len(operands) == 3:
        r, a, b = operands
        return f"{r} = {a} {_BINARY[m.group(1)]} {b};"
    m = re.fullmatch(r"\{ \.reg \.pred p; setp\.(le|lt|ge|gt|eq|ne)\.f(32|64) p, %1, %2; selp\.u32 %0, 1, 0, p; \}", t)
    if m and len(operands) == 3:
        r, a, b = operands
        return f"{r} = ({a} {_COMPARE[m.group(1)]} {b}) ? 1u : 0u;"
    raise TranslationError(f"inline PTX the emulator does not know: {template!r}")


def _asm(src: str) -> tuple[str, int]:
    n = 0

    def repl(m):
        nonlocal n
        n += 1
        template = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', m.group(1)))
        operands = [o.strip() for o in _OPERAND.findall(m.group(2))]
        return _asm_statement(template, operands) + _newlines(m.group(0))

    return _ASM.sub(repl, src), n


def translate(cu: Path, library: str = "jsigr_fast", target: str = NAMESPACE) -> str:
    """The emulator's C++ for one .cu file whose CUDA kernels are registered for `library`; they are
    registered as the CPU kernels of `target` instead."""
    cu = Path(cu).resolve()
    src = cu.read_text()
    csrc = cu.parent.parent
    expected = {"launches": src.count("<<<"), "shared": len(re.findall(r"\b__shared__\b", src)),
                "asm": len(re.findall(r"\basm\s*(?:volatile\s*)?\(", src))}
    src = re.sub(r"^\s*#\s*include\s*<c10/cuda/[^>]+>", lambda m: "// (emulated) " + m.group(0).strip(), src, flags=re.M)
    src = re.sub(r'^(\s*#\s*include\s*)"\.\./([^"]+)"', lambda m: f'{m.group(1)}"{csrc / m.group(2)}"', src, flags=re.M)
    src, n_launch = _launches(src)
    src, n_shared = _shared(src)
    src, n_asm = _asm(src)
    got = {"launches": n_launch, "shared": n_shared, "asm": n_asm}
    if got != expected:
        raise TranslationError(f"{cu.name}: rewrote {got}, but the source has {expected}")
    src = src.replace(".is_cuda()", ".is_cpu()")
    src, n_impl = re.subn(rf"TORCH_LIBRARY_IMPL\(\s*{library}\s*,\s*CUDA\s*,", f"TORCH_LIBRARY_IMPL({target}, CPU,", src)
    if n_impl != 1:
        raise TranslationError(f"{cu.name}: expected one TORCH_LIBRARY_IMPL({library}, CUDA, m), found {n_impl}")
    for left in ("<<<", "__shared__", "c10/cuda/CUDA"):
        if left in src.replace("// (emulated) #include <c10/cuda/", ""):
            raise TranslationError(f"{cu.name}: {left!r} left after the translation")
    return f'#include "{HERE / "cuda_emu.h"}"\n#line 1 "{cu}"\n' + src


def schemas(ops_cpp: Path) -> str:
    """csrc/ops.cpp with its schemas declared in the emulator's namespace."""
    ops_cpp = Path(ops_cpp).resolve()
    src = ops_cpp.read_text()
    src, n = re.subn(r"TORCH_LIBRARY\(\s*jsigr_fast\s*,", f"TORCH_LIBRARY({NAMESPACE},", src)
    if n != 1:
        raise TranslationError(f"{ops_cpp.name}: expected one TORCH_LIBRARY(jsigr_fast, m), found {n}")
    # the module init of jsigr_fast._C must not be defined twice in the process
    return f'#define PyInit__C PyInit__{NAMESPACE}_unused\n#line 1 "{ops_cpp}"\n' + src
