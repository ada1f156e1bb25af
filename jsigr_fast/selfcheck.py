"""``jsigr-fast check``: does this install compute the right thing on this machine?

The fused backend's kernels (C++ on the CPU; compiled CUDA or Triton on a GPU) are checked against
the reference backend (plain autograd, the library's oracle) on the machine they will run on, in
three tiers per device and GPU kernel set:

* **exact**: the small test models of :mod:`jsigr_fast.testing` (train- and eval-mode BatchNorm, a
  residual block, max-pooling, dropout) in float64, every J-SIGR variant (projection, Hutchinson,
  quantile mask, ``mode="fd"``) and double backprop: the loss and every parameter gradient agree to
  ``1e-9`` relative (rounding only; a wrong kernel is off by far more).
* **float32**: a CIFAR ResNet-20 (GELU, so that no ReLU kink amplifies rounding) on a channels-last
  batch of 16, J-SIGR by projection and by Hutchinson without a saliency mask (a mask threshold would
  flip features on rounding): relative error of the loss and of the whole gradient vector
  ``<= 1e-3`` (measured ~1e-5 on a CPU). TF32 is switched off while it runs.
* **exact variant** (not with ``--quick``): the exact tier's J-SIGR and double-backprop checks on the
  batch-norm models with each candidate per-device setting forced (:data:`VARIANTS`: ATen's batch-norm
  kernels inside the fused ops, the grad_y rebuild, ATen's conv / ReLU), so that one found faster on a
  GPU is known exact there before it is switched on.
* **bfloat16**: the same under ``torch.autocast(bfloat16)``, by flash-attention's rule: the fused
  backend's error against the float32 reference is at most 2x plain PyTorch's error in bf16
  (plus 1 % of the value for the loss, a single number whose error is noisy).

Before those, one **build** check per device: the extension raises a clean ``RuntimeError`` on a bad
argument, run in a subprocess so that a crash is reported rather than suffered. An extension built by
another C++ toolchain than torch's can compute right and still die formatting its first error message
(seen on a GPU image whose ``CXX`` was a compiler-wrapper script: ``bench/results/gpu_session_h200_*.md``).

Exit status 0 when every check passes (or a backend is unavailable, which is reported: the library
then computes with the reference), 1 when one fails, 2 on a bad argument. ``--quick`` runs the exact
tier only (seconds); ``--json PATH`` writes the results.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

EXACT_MODELS = ("conv_bn_train", "conv_bn_eval", "residual_bn", "residual_bn_relu", "maxpool_relu", "dropout")
EXACT_LOSSES = {
    "J-SIGR projection": dict(jacobian="projection", n_proj=2),
    "J-SIGR Hutchinson": dict(jacobian="hutchinson"),
    "J-SIGR quantile mask": dict(mask_quantile=0.5),
    "J-SIGR fd": dict(mode="fd"),
    "double backprop": None,
}
REALISTIC_LOSSES = {"J-SIGR projection": dict(jacobian="projection"), "J-SIGR Hutchinson": dict(jacobian="hutchinson")}
EXACT_RTOL = 1e-9
FLOAT32_RTOL = 1e-3


@dataclass
class Result:
    device: str
    kernels: str  # "cpu", "cuda" or "triton": which implementation the fused ops ran
    tier: str
    check: str
    model: str
    error: float  # exact/float32: worst relative error; bf16: fused error / allowed error
    tolerance: float
    passed: bool
    detail: str = ""


def _run(model, x, y, backend: str, loss_kwargs, *, autocast=None):
    """Loss and parameter gradients, with the same random draws (probes, dropout) for both backends."""
    import jsigr_fast

    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(5)
    with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        if loss_kwargs is None:
            out = jsigr_fast.double_backprop(model, x, y, backend=backend)
        else:
            out = jsigr_fast.loss(model, x, y, backend=backend, generator=gen, **loss_kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return out.detach().double().cpu(), [g.detach().double().cpu() for g in grads]


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(b.abs().max())
    return float((a - b).abs().max()) / den if den > 0 else float((a - b).abs().max())


def _exact_error(ref, got) -> float:
    (lr, gr), (lf, gf) = ref, got
    # every gradient relative to the model's largest one: a parameter whose true gradient is 0 (a conv
    # bias before train-mode BN) carries only rounding noise
    scale = max(float(g.abs().max()) for g in gr) or 1.0
    return max([_rel(lf, lr)] + [float((a - b).abs().max()) / scale for a, b in zip(gf, gr)])


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def _norm_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@contextmanager
def _no_tf32():
    """Full float32 convolutions and matmuls on the GPU while comparing (TF32 rounds to ~1e-3)."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def exact_tier(device: torch.device, kernels: str, report) -> None:
    from .testing import tiny_input, tiny_model

    for name in EXACT_MODELS:
        model = tiny_model(name).to(device)
        x = tiny_input(name).to(device)
        y = (torch.arange(x.shape[0]) % 4).to(device)
        for check, kw in EXACT_LOSSES.items():
            try:
                err = _exact_error(_run(model, x, y, "reference", kw), _run(model, x, y, "fused", kw))
                report(Result(str(device), kernels, "exact", check, name, err, EXACT_RTOL, err <= EXACT_RTOL))
            except Exception as exc:  # noqa: BLE001 - a crash is a failed check, reported with its reason
                report(Result(str(device), kernels, "exact", check, name, math.nan, EXACT_RTOL, False, _reason(exc)))


# The per-device settings a GPU run times as ablations before one is switched on there (bench_fused.py
# --ablation aten_bn / bn_rebuild / aten_rules / recompute): each is checked exact here first, on the machine.
VARIANTS = {
    "ATen batch-norm kernels": ("ops", "ATEN_BN_KERNELS", ("forward", "backward")),
    "grad_y rebuilt": ("ops", "BN_REBUILD_GRAD_Y", True),
    "ATen conv / ReLU": ("fused", "LAYER_RULES", ()),
    "conv input recomputed": ("fused", "RECOMPUTE_CONV_INPUT", True),
}
VARIANT_MODELS = ("conv_bn_train", "residual_bn", "residual_bn_relu")
VARIANT_LOSSES = ("J-SIGR projection", "J-SIGR Hutchinson", "double backprop")


def variant_tier(device: torch.device, kernels: str, report) -> None:
    """The exact tier's check for each of :data:`VARIANTS`, with that setting forced for the device."""
    import importlib

    from ._settings import device_setting
    from .testing import tiny_input, tiny_model

    for variant, (module, name, value) in VARIANTS.items():
        table = getattr(importlib.import_module(f"jsigr_fast.{module}"), name)
        for model_name in VARIANT_MODELS:
            model = tiny_model(model_name).to(device)
            x = tiny_input(model_name).to(device)
            y = (torch.arange(x.shape[0]) % 4).to(device)
            for check in VARIANT_LOSSES:
                kw = EXACT_LOSSES[check]
                label = f"{check}, {variant}"
                try:
                    ref = _run(model, x, y, "reference", kw)
                    with device_setting(table, device.type, value):
                        got = _run(model, x, y, "fused", kw)
                    err = _exact_error(ref, got)
                    report(Result(str(device), kernels, "exact variant", label, model_name, err, EXACT_RTOL,
                                  err <= EXACT_RTOL))
                except Exception as exc:  # noqa: BLE001
                    report(Result(str(device), kernels, "exact variant", label, model_name, math.nan, EXACT_RTOL,
                                  False, _reason(exc)))


def realistic_tiers(device: torch.device, kernels: str, report) -> None:
    from .models import get_model

    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_model("resnet20", dataset="cifar10", activation="gelu").to(device).train()
    x = torch.rand(16, 3, 32, 32, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    y = (torch.arange(16) % 10).to(device)
    for check, kw in REALISTIC_LOSSES.items():
        kw = dict(kw, saliency="none")
        try:
            with _no_tf32():
                lr, gr = _run(model, x, y, "reference", kw)
                lf, gf = _run(model, x, y, "fused", kw)
                err = max(_rel(lf, lr), _norm_rel(_flat(gf), _flat(gr)))
                report(Result(str(device), kernels, "float32", check, "resnet20 (GELU), b16, channels-last", err,
                              FLOAT32_RTOL, err <= FLOAT32_RTOL))
                lbr, gbr = _run(model, x, y, "reference", kw, autocast=torch.bfloat16)
                lbf, gbf = _run(model, x, y, "fused", kw, autocast=torch.bfloat16)
            ref_loss, got_loss = _rel(lbr, lr), _rel(lbf, lr)
            ref_grad, got_grad = _norm_rel(_flat(gbr), _flat(gr)), _norm_rel(_flat(gbf), _flat(gr))
            # error / allowed error; <= 1 passes
            ratio = max(got_loss / (2 * ref_loss + 0.01), got_grad / max(2 * ref_grad, 1e-12))
            report(Result(str(device), kernels, "bf16", check, "resnet20 (GELU), b16, channels-last", ratio, 1.0,
                          ratio <= 1.0, f"loss error {got_loss:.2e} (plain PyTorch {ref_loss:.2e}), gradient "
                                        f"{got_grad:.2e} ({ref_grad:.2e})"))
        except Exception as exc:  # noqa: BLE001
            report(Result(str(device), kernels, "float32/bf16", check, "resnet20 (GELU), b16, channels-last",
                          math.nan, FLOAT32_RTOL, False, _reason(exc)))


# A bad argument (a mask of the wrong shape) for each device named on the command line: the op must raise.
_ERROR_PATH_SCRIPT = """
import sys, torch, jsigr_fast
for dev in sys.argv[1:]:
    try:
        torch.ops.jsigr_fast.masked_sq_norm(torch.ones(3, 4, device=dev), torch.ones(2, device=dev))
    except RuntimeError:
        print("raised", dev, flush=True)
"""


def error_path_results(devices: list[str]) -> list[Result]:
    """The build check: in a subprocess, each device's op raises a RuntimeError on a bad argument."""
    # this process's import path, in its order: the child imports the same jsigr_fast (a source checkout
    # too) without putting site-packages ahead of the standard library
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    try:
        r = subprocess.run([sys.executable, "-c", _ERROR_PATH_SCRIPT, *devices], env=env, capture_output=True,
                           text=True, timeout=300)
        code, out, err = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired:
        code, out, err = None, "", "timed out after 300 s"
    results = []
    for dev in devices:
        ok = f"raised {dev}" in out.split("\n")
        if ok:
            detail = ""
        elif code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            detail = (f"the process died of {name} raising an argument error: the extension was likely built by "
                      "another C++ toolchain than torch's (a compiler wrapper, another libstdc++); rebuild it with "
                      "the compiler torch was built with (torch.__config__.show())")
        else:
            detail = f"no RuntimeError for a bad argument (exit {code}): {err.strip()[-300:]}"
        results.append(Result(dev, "-", "build", "error path", "masked_sq_norm, bad mask shape", math.nan,
                              math.nan, ok, detail))
    return results


def environment() -> dict:
    import jsigr_fast
    from . import ops
    from ._extension import extension_error, has_kernel

    info = {"jsigr_fast": jsigr_fast.__version__, "torch": str(torch.__version__),
            "extension": "loaded" if extension_error() is None else f"not loaded ({extension_error()})",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "gpu_kernels": ops.gpu_kernels()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["compiled_cuda_ops"] = sorted(op for names in ops.TRITON_OPS.values() for op in names
                                       if has_kernel(op, "cuda"))
    return info


def devices_to_check(which: str) -> list[tuple[torch.device, str]]:
    """(device, kernel set) pairs: the CPU's C++ kernels; on a GPU the compiled CUDA kernels and,
    with Triton installed, the Triton ones."""
    from . import ops

    out = []
    if which in ("cpu", "all"):
        out.append((torch.device("cpu"), "cpu"))
    if which in ("cuda", "all") and torch.cuda.is_available():
        out.append((torch.device("cuda"), "cuda"))
        if ops.gpu_kernels() is not None and ops._triton_importable():
            out.append((torch.device("cuda"), "triton"))
    return out


def run_checks(which: str = "all", *, quick: bool = False, report=None) -> list[Result]:
    """Every check for the devices ``which`` names ("cpu", "cuda" or "all"); ``report(result)`` is
    called as each finishes. The GPU kernel choice (:func:`jsigr_fast.ops.use_gpu_kernels`) and the
    global random generators (the checks seed them) are restored afterwards."""
    import jsigr_fast
    from . import ops

    results: list[Result] = []

    def add(r: Result) -> None:
        results.append(r)
        if report is not None:
            report(r)

    pairs = devices_to_check(which)
    if jsigr_fast.extension_error() is None:
        for r in error_path_results(sorted({d.type for d, _ in pairs}, key=("cpu", "cuda").index)):
            add(r)
    cuda = [torch.cuda.current_device()] if any(d.type == "cuda" for d, _ in pairs) else []
    before = ops.gpu_kernels()
    with torch.random.fork_rng(devices=cuda):
        try:
            for device, kernels in pairs:
                _check_device(device, kernels, quick, add)
        finally:
            if before is not None and ops.gpu_kernels() != before:
                ops.use_gpu_kernels(before)
    return results


def _check_device(device: torch.device, kernels: str, quick: bool, add) -> None:
    import jsigr_fast
    from . import ops

    if "fused" not in jsigr_fast.available_backends(device):
        add(Result(str(device), kernels, "-", "fused backend", "-", math.nan, math.nan, True,
                   f"unavailable ({jsigr_fast.extension_error() or 'no kernel for this device'}): "
                   "losses use the reference backend"))
        return
    if device.type == "cuda":
        ops.use_gpu_kernels(kernels)
    exact_tier(device, kernels, add)
    if not quick:
        variant_tier(device, kernels, add)
        realistic_tiers(device, kernels, add)


def _row(r: Result) -> str:
    err = "–" if math.isnan(r.error) else f"{r.error:.2e}"
    tol = "–" if math.isnan(r.tolerance) else f"{r.tolerance:.0e}" if r.tier != "bf16" else "≤ 1 (2× rule)"
    verdict = "ok" if r.passed else "**FAIL**"
    if math.isnan(r.tolerance) and r.tier == "-":  # nothing to check (a backend unavailable)
        verdict = "n/a"
    return f"| {r.device} | {r.kernels} | {r.tier} | {r.check} | {r.model} | {err} | {tol} | {verdict} | {r.detail} |"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                   help="which devices to check (default: the CPU and, when present, the GPU)")
    p.add_argument("--quick", action="store_true", help="the exact float64 tier only (seconds)")
    p.add_argument("--json", metavar="PATH", help="also write the results (and the environment) as JSON")


def run(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("jsigr-fast check: error: --device cuda: CUDA is not available on this machine", file=sys.stderr)
        return 2
    if args.json and os.path.isdir(args.json):
        print(f"jsigr-fast check: error: --json {args.json} is a folder; give a file name", file=sys.stderr)
        return 2
    env = environment()
    print("jsigr-fast check: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "compiled_cuda_ops"),
          flush=True)
    print("\n| device | kernels | tier | check | model | error | tolerance | result | detail |\n"
          "|---|---|---|---|---|---:|---:|---|---|", flush=True)
    t0 = time.perf_counter()
    results = run_checks(args.device, quick=args.quick, report=lambda r: print(_row(r), flush=True))
    failed = [r for r in results if not r.passed]
    seconds = time.perf_counter() - t0
    print(f"\n{len(results) - len(failed)} of {len(results)} checks passed in {seconds:.0f} s" +
          (f"; FAILED: {', '.join(f'{r.device}/{r.kernels} {r.tier} {r.check} on {r.model}' for r in failed)}"
           if failed else ""))
    if args.json:
        from ._atomic import write_atomic

        record = {"environment": env, "seconds": seconds, "results": [asdict(r) for r in results]}
        write_atomic(args.json, lambda f: f.write(json.dumps(record, indent=2, allow_nan=True).encode()))
    return 1 if failed else 0
