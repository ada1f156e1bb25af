"""Train-mode BatchNorm kernels: fused ops vs ATen, milliseconds and achieved GB/s vs copy bandwidth.

    python bench/bench_bn.py --out bench/results                     # CPU, ResNet-20 shapes at batch 128
    python bench/bench_bn.py --device cuda --dtype bfloat16 --out bench/results

For each (shape, layout) it first checks the fused ops against the plain-PyTorch references of
``jsigr_fast.reference`` (the same functions the tests use), then times

* forward:          ``jsigr_fast::batch_norm_train``  vs  ``F.batch_norm(training=True)`` (ATen native)
* backward:         ``jsigr_fast::batch_norm_backward``  vs  ``aten.native_batch_norm_backward``
* double backward:  the autograd node of each (our ``batch_norm_double_backward`` kernel vs ATen's
  ``NativeBatchNormBackwardBackward0``, a chain of small kernels), both reached the way a gradient
  penalty reaches them: ``autograd.grad`` of the input gradient w.r.t. (x, grad_y, weight).

GB/s counts the minimum traffic (every input read once, every output written once: forward 2,
backward 3, double backward 5 tensors of x's size); the copy bandwidth is ``dst.copy_(src)`` of a
256 MiB tensor (read + write). Results: ``<out>/bn_<device>_<dtype>.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from steps import conditions, gpu_kernel_impls, publish, using_gpu_kernels  # noqa: E402

import jsigr_fast  # noqa: E402,F401  (loads the extension)
from jsigr_fast import reference  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
RESNET20_SHAPES = ((128, 16, 32, 32), (128, 32, 16, 16), (128, 64, 8, 8))


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, repeats, min_time=0.2):
    """Median / p20 / p80 seconds of fn() over `repeats` samples, each averaging enough calls for min_time/repeats."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    inner = max(1, int(min_time / repeats / one))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / inner)
    t = torch.tensor(samples, dtype=torch.float64)
    return {"median_s": float(t.quantile(0.5)), "p20_s": float(t.quantile(0.2)), "p80_s": float(t.quantile(0.8))}


def copy_bandwidth(device, repeats):
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    r = timeit(lambda: dst.copy_(src), device, repeats)
    return 2 * src.numel() * 4 / r["median_s"] / 1e9


def make_inputs(shape, dtype, device, channels_last, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def rnd(*s, scale=1.0, shift=0.0):
        return (torch.randn(s, generator=g) * scale + shift).to(device=device, dtype=dtype)

    c = shape[1]
    x = rnd(*shape, scale=2.0, shift=0.5).contiguous(memory_format=fmt)
    gy = rnd(*shape).contiguous(memory_format=fmt)
    u = rnd(*shape).contiguous(memory_format=fmt)
    w = rnd(c, scale=0.5, shift=1.0)
    b = rnd(c, scale=0.5)
    return x, gy, u, w, b


def check(x, gy, u, w, b, eps=1e-5):
    """Fused ops vs the references (float32 reference on upcast inputs); returns max relative errors."""
    ops = torch.ops.jsigr_fast
    y, mean, invstd = ops.batch_norm_train(x, w, b, eps)
    y_r, mean_r, invstd_r = reference.batch_norm_train_ref(x.float(), w.float(), b.float(), eps)
    gx = ops.batch_norm_backward(gy, x, w, mean, invstd, None, None)
    gx_r = reference.batch_norm_backward_ref(gy.float(), x.float(), w.float(), mean_r, invstd_r)
    dd = ops.batch_norm_double_backward(u, None, None, gy, x, w, mean, invstd, None, None)
    dd_r = reference.batch_norm_double_backward_ref(u.float(), None, None, gy.float(), x.float(), w.float(), mean_r,
                                                    invstd_r)

    def rel(a, r):
        return float((a.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30))

    return {"forward": rel(y, y_r), "backward": rel(gx[0], gx_r[0]), "double_backward": max(rel(dd[0], dd_r[0]),
                                                                                             rel(dd[1], dd_r[1]))}


def bench_shape(shape, dtype, device, channels_last, repeats, eps=1e-5):
    """Rows for one shape: the fused ops under each GPU implementation (gpu_kernel_impls: "cuda" and
    "triton" side by side on a GPU, labelled "fused/<impl>"; plain "fused" on CPU), and ATen's."""
    x, gy, u, w, b = make_inputs(shape, dtype, device, channels_last)
    ops = torch.ops.jsigr_fast
    rows, errs = [], {}
    elt = x.element_size() * x.numel()

    def add(op, impl, r, tensors):
        r.update(op=op, impl=impl, gbps=tensors * elt / r["median_s"] / 1e9)
        rows.append(r)

    for gpu_impl in gpu_kernel_impls(device):
        fused = "fused" if gpu_impl is None else f"fused/{gpu_impl}"
        with using_gpu_kernels(gpu_impl), torch.no_grad():
            errs[fused] = check(x, gy, u, w, b, eps)
            add("forward", fused, timeit(lambda: ops.batch_norm_train(x, w, b, eps), device, repeats), 2)
            _, mean, invstd = ops.batch_norm_train(x, w, b, eps)
            add("backward", fused, timeit(lambda: ops.batch_norm_backward(gy, x, w, mean, invstd, None, None), device,
                                          repeats), 3)
            add("double_backward", f"{fused} (kernel)", timeit(lambda: ops.batch_norm_double_backward(
                u, None, None, gy, x, w, mean, invstd, None, None), device, repeats), 5)
    with torch.no_grad():
        add("forward", "aten", timeit(lambda: F.batch_norm(x, None, None, w, b, True, 0.1, eps), device, repeats), 2)
        _, smean, sinvstd = torch.ops.aten.native_batch_norm(x, w, b, None, None, True, 0.1, eps)[:3]
        add("backward", "aten", timeit(lambda: torch.ops.aten.native_batch_norm_backward(
            gy, x, w, None, None, smean, sinvstd, True, eps, [True, True, True]), device, repeats), 3)

    # the autograd nodes, reached as a gradient penalty reaches them
    def node_time(bn):
        xg = x.detach().requires_grad_(True)
        wg = w.detach().requires_grad_(True)
        gyg = gy.detach().requires_grad_(True)
        with torch.enable_grad():
            yv = bn(xg, wg)
            (gx,) = torch.autograd.grad(yv, xg, gyg, create_graph=True)
        return timeit(lambda: torch.autograd.grad(gx, (xg, gyg, wg), u, retain_graph=True), device, repeats)

    for gpu_impl in gpu_kernel_impls(device):
        fused = "fused" if gpu_impl is None else f"fused/{gpu_impl}"
        with using_gpu_kernels(gpu_impl):
            add("double_backward", f"{fused} (autograd)", node_time(lambda t, wt: jsigr_fast.ops.batch_norm(
                t, None, None, wt, b, True, 0.1, eps)), 5)
    add("double_backward", "aten (autograd)", node_time(lambda t, wt: F.batch_norm(t, None, None, wt, b, True, 0.1,
                                                                                    eps)), 5)
    for r in rows:
        r.update(shape=list(shape), channels_last=channels_last)
    return rows, errs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--layouts", default="contiguous,channels_last")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    dtype = DTYPES[a.dtype]
    shapes = [(a.batch,) + s[1:] for s in RESNET20_SHAPES]
    cond = conditions(a.device)
    cond.update({"dtype": a.dtype, "batch": a.batch})
    cond["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    print("conditions:", json.dumps(cond))
    bw = copy_bandwidth(a.device, a.repeats)
    print(f"copy bandwidth (read + write of 256 MiB): {bw:.1f} GB/s")
    rows, checks = [], {}
    for shape in shapes:
        for layout in a.layouts.split(","):
            cl = layout == "channels_last"
            r, errs = bench_shape(shape, dtype, a.device, cl, a.repeats)
            for impl, e in errs.items():
                checks[f"{shape} {layout} {impl}"] = e
            rows += r
            for x in r:
                print(f"  {str(shape):18s} {layout:14s} {x['op']:16s} {x['impl']:18s} {x['median_s'] * 1e3:8.3f} ms "
                      f"{x['gbps']:6.1f} GB/s", flush=True)
    lines = [f"### Train-mode BatchNorm kernels — {a.dtype}, {cond['device']}", "",
             f"torch {cond['torch']}, threads {cond['threads']}, commit {cond['commit']}, {cond['date']}; median of "
             f"{a.repeats} samples (p20–p80). GB/s = minimum traffic (fwd 2, bwd 3, double bwd 5 tensors of x's size) "
             f"/ time; copy bandwidth (256 MiB `copy_`, read + write) **{bw:.1f} GB/s**.", "",
             "| shape | layout | op | impl | ms | GB/s | % of copy BW | speedup vs aten |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        layout = "channels_last" if r["channels_last"] else "contiguous"
        base = [q for q in rows if q["shape"] == r["shape"] and q["channels_last"] == r["channels_last"]
                and q["op"] == r["op"] and q["impl"].startswith("aten")]
        same_kind = [q for q in base if ("autograd" in q["impl"]) == ("autograd" in r["impl"])] or base
        speed = f"{same_kind[0]['median_s'] / r['median_s']:.2f}x" if same_kind and not r["impl"].startswith("aten") else ""
        lines.append(f"| {tuple(r['shape'])} | {layout} | {r['op']} | {r['impl']} | {r['median_s'] * 1e3:.3f} "
                     f"[{r['p20_s'] * 1e3:.3f}–{r['p80_s'] * 1e3:.3f}] | {r['gbps']:.1f} | {100 * r['gbps'] / bw:.0f} % "
                     f"| {speed} |")
    lines += ["", "Correctness first (max |fused − reference| / max |reference|, float32 reference):", ""]
    lines += [f"- {k}: " + ", ".join(f"{op} {v:.1e}" for op, v in e.items()) for k, e in checks.items()]
    publish(lines, a.out, f"bn_{torch.device(a.device).type}_{a.dtype}",
            {"conditions": cond, "copy_gbps": bw, "rows": rows, "checks": checks})


if __name__ == "__main__":
    main()
