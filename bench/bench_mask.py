"""Selective-mask ops: compiled kernels vs the plain-PyTorch references, ms and achieved GB/s vs copy bandwidth.

    python bench/bench_mask.py --out bench/results                     # CPU, float32
    python bench/bench_mask.py --dtype bfloat16 --out bench/results
    python bench/bench_mask.py --device cuda --out bench/results       # a GPU session

Shapes: CIFAR-like ``(128, 3, 32, 32)`` and ImageNet-like ``(64, 3, 224, 224)`` (``--shapes``). ``g`` is a
standard-normal stand-in for the perturbed-input gradient. For each shape it first checks every compiled op
against its reference (``jsigr_fast.reference``, the functions the tests use) and then times, interleaved
in rounds (round ``i`` takes one sample of every implementation, in an order rotated by ``i``, so machine
noise hits all alike; a sample averages enough calls to last ``--sample-ms``; the cell is the median over
``--repeats`` rounds, p20-p80 in brackets):

===============================  ======================================================  =====================
op                               compiled                                                reference
===============================  ======================================================  =====================
gradient mask, beta              ``ops.gradient_saliency_mask(g, beta)``                 ``gradient_saliency_mask_ref``
gradient mask, quantile 0.3      ``ops.gradient_saliency_mask(g, beta, quantile=0.3)``   same ref, ``kthvalue``
threshold mask                   ``ops.threshold_mask(M, beta)``                          ``threshold_mask_ref``
adaptor mask                     ``ops.adaptor_saliency_mask(g, W[C,C,1,1], b[C], beta)`` ``adaptor_saliency_mask_ref``
masked sq norm, forward          ``jsigr_fast::masked_sq_norm_bool(g, mask)``            ``(g * mf).pow(2).flatten(1).sum(1)``
                                 ``ops.masked_sq_norm(g, mf)`` (older float-mask kernel)
masked sq norm, backward         ``jsigr_fast::masked_sq_norm_bool_backward(go, g, mask)`` autograd of the line above
                                 ``jsigr_fast::masked_sq_norm_backward(go, g, mf)``
===============================  ======================================================  =====================

(``mf`` = the mask as a float tensor of g's dtype, precomputed: the float-mask path before the bool kernels.)
Each shape also times two yardsticks that read g and write a g-sized tensor: ``dst.copy_(g)`` into a
preallocated ``dst`` and ``g * 2`` into a fresh output (what an out-of-place op pays: on Linux a fresh
allocation over glibc's 32 MiB mmap ceiling, e.g. a float32 ImageNet-sized gradient, is page-faulted in on
every call), and, as diagnostics, the two bool-mask norm kernels with an all-true mask (no data-dependent
branch), which isolates what the random mask's branches cost.

Bytes moved (E = N*D features, s = g's itemsize, a bool is 1 byte; the minimal reads + writes of each
op's algorithm, every tensor touched once per pass; per-sample [N] vectors and the C x C weight counted
but negligible):

* gradient mask (beta):   2 E s + E       two passes over g (per-sample max |g|, then |g|/max <= beta), 1-byte mask.
* threshold mask:         E s + E         read M, write the mask.
* adaptor mask:           2 E s + E       two passes over g (per-sample rms, then tanh(conv1x1(g/rms)) <= beta).
* bool norm forward:      E s + E + N s   read g and the 1-byte mask, write [N].
* bool norm backward:     2 E s + E + N s read grad_out [N], g and the mask, write grad_g.
* float norm forward:     2 E s + N s     read g and the float mask (reference and the older kernel alike).
* float norm backward:    3 E s + N s     read g and the float mask, write grad_g.
* gradient mask, quantile: not bandwidth-bound (a per-sample ``nth_element``): time and ratio only.

The references are charged the same minimal traffic as the op they stand for (their real traffic is
higher: every intermediate is a full tensor), so their GB/s is "effective". The two-pass ops' floor if the
second pass hit cache would be ``E s + E``: the md notes it. Copy bandwidth is ``dst.copy_(src)`` of a
256 MiB float32 tensor (read + write), measured at start and at end; percentages use the larger. Note
that on a CPU a g that fits the last-level cache (CIFAR: 1.5 MB fp32) stays cache-resident across the
repeated calls, so its "GB/s" can exceed the DRAM copy rate; the ImageNet-like g (38.5 MB fp32) does not
fit a 32 MiB L3. Outputs are allocated per call, as in the library (first-touch page faults included).

Results: ``<out>/mask_<device>_<dtype>.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from steps import conditions, gpu_kernel_impls, publish, using_gpu_kernels  # noqa: E402

import jsigr_fast  # noqa: E402,F401  (loads the extension)
from jsigr_fast import ops, reference  # noqa: E402
from jsigr_fast.saliency import gradient_saliency  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
SHAPES = "128x3x32x32,64x3x224x224"


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def once(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def copy_bandwidth(device, repeats):
    """GB/s of ``dst.copy_(src)``, 256 MiB float32 (read + write), median of `repeats` samples."""
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    ts = sorted(once(lambda: dst.copy_(src), device) for _ in range(max(3, repeats)))
    return 2 * src.numel() * 4 / ts[len(ts) // 2] / 1e9


def interleaved(cases, device, repeats, sample_ms):
    """{key: [seconds per call] * repeats}: round i runs one sample of every case, order rotated by i."""
    keys = list(cases)
    inner = {}
    for k in keys:  # warm up (allocator, lazy init) and calibrate the calls per sample
        cases[k]()
        one = min(once(cases[k], device) for _ in range(2))
        inner[k] = max(1, int(sample_ms / 1e3 / max(one, 1e-7)))
    samples = {k: [] for k in keys}
    for i in range(repeats):
        for k in keys[i % len(keys):] + keys[:i % len(keys)]:
            fn, n = cases[k], inner[k]
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync(device)
            samples[k].append((time.perf_counter() - t0) / n)
    return samples, inner


def stats(ts):
    t = torch.tensor(ts, dtype=torch.float64)
    return {"median_s": float(t.quantile(0.5)), "p20_s": float(t.quantile(0.2)), "p80_s": float(t.quantile(0.8))}


def make_inputs(shape, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    g = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    c = shape[1]
    # an adaptor a little away from its identity start (SaliencyAdaptor initialises W = I, b = 0)
    weight = (torch.eye(c) + 0.2 * torch.randn(c, c, generator=gen)).view(c, c, 1, 1).to(device=device, dtype=dtype)
    bias = (0.1 * torch.randn(c, generator=gen)).to(device=device, dtype=dtype)
    go = torch.randn(shape[0], generator=gen).to(device=device, dtype=dtype)
    return g, weight, bias, go


def check(g, weight, bias, go, beta, quantile, adaptor_beta):
    """Compiled ops vs references: mask mismatch counts, max relative errors of the norms."""
    K = torch.ops.jsigr_fast
    res = {}

    def mism(a, b):
        return int((a != b).sum())

    m_ref = reference.gradient_saliency_mask_ref(g, beta)
    m = ops.gradient_saliency_mask(g, beta, compiled=True)
    res["gradient_mask_mismatches"] = mism(m, m_ref)
    res["mask_fraction_true"] = float(m_ref.float().mean())
    res["gradient_mask_quantile_mismatches"] = mism(ops.gradient_saliency_mask(g, beta, quantile, compiled=True),
                                                    reference.gradient_saliency_mask_ref(g, beta, quantile))
    M = gradient_saliency(g)
    res["threshold_mask_mismatches"] = mism(ops.threshold_mask(M, beta, compiled=True),
                                            reference.threshold_mask_ref(M, beta))
    a = ops.adaptor_saliency_mask(g, weight, bias, adaptor_beta, compiled=True)
    a_ref = reference.adaptor_saliency_mask_ref(g, weight, bias, adaptor_beta)
    res["adaptor_mask_mismatches"] = mism(a, a_ref)
    if res["adaptor_mask_mismatches"]:  # allowed only where M lies within rounding of beta
        Ma = reference.adaptor_saliency_ref(g.float(), weight.float(), bias.float())
        res["adaptor_mismatch_max_abs_M_minus_beta"] = float((Ma[a != a_ref] - adaptor_beta).abs().max())
    res["adaptor_fraction_true"] = float(a_ref.float().mean())

    def rel(x, r):
        return float((x.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-30))

    mf = m.to(g.dtype)
    gf, mff = g.double(), m.double()
    n_ref = (gf * mff).pow(2).flatten(1).sum(1)  # float64 reference on the upcast inputs
    res["norm_fwd_bool_rel"] = rel(K.masked_sq_norm_bool(g, m), n_ref)
    res["norm_fwd_float_kernel_rel"] = rel(ops.masked_sq_norm(g, mf, compiled=True), n_ref)
    res["norm_fwd_torch_rel"] = rel((g * mf).pow(2).flatten(1).sum(1), n_ref)
    b_ref = 2 * go.double().view(-1, *[1] * (g.dim() - 1)) * mff * gf
    res["norm_bwd_bool_rel"] = rel(K.masked_sq_norm_bool_backward(go, g, m), b_ref)
    res["norm_bwd_float_kernel_rel"] = rel(K.masked_sq_norm_backward(go, g.contiguous(), mf), b_ref)
    gr = g.detach().requires_grad_(True)
    (b_t,) = torch.autograd.grad((gr * mf).pow(2).flatten(1).sum(1), gr, go)
    res["norm_bwd_torch_rel"] = rel(b_t, b_ref)
    tol = 1e-5 if g.dtype in (torch.float32, torch.float64) else 3e-2
    res["ok"] = (res["gradient_mask_mismatches"] == 0 and res["gradient_mask_quantile_mismatches"] == 0
                 and res["threshold_mask_mismatches"] == 0
                 and res.get("adaptor_mismatch_max_abs_M_minus_beta", 0.0) <= 10 * tol
                 and all(v <= tol for k, v in res.items() if k.startswith("norm_")))
    return res


def bench_shape(shape, dtype, device, repeats, sample_ms, beta, quantile, adaptor_beta):
    g, weight, bias, go = make_inputs(shape, dtype, device)
    errs = {}  # per GPU implementation ("" on CPU): the ops' results vs the references
    for impl in gpu_kernel_impls(device):
        with using_gpu_kernels(impl):
            errs[impl or ""] = check(g, weight, bias, go, beta, quantile, adaptor_beta)
    K = torch.ops.jsigr_fast
    s, E, N = g.element_size(), g.numel(), shape[0]
    mask = ops.gradient_saliency_mask(g, beta, compiled=True)
    mf = mask.to(dtype)
    M = gradient_saliency(g)
    dst = torch.empty_like(g)
    ones = torch.ones_like(mask)
    gr = g.detach().requires_grad_(True)
    with torch.enable_grad():
        out_t = (gr * mf).pow(2).flatten(1).sum(1)

    # (op, impl) -> (fn, bytes moved (None: not bandwidth-bound), floor if a second pass hits cache)
    cases = {
        ("gradient mask, beta", "compiled"): (lambda: ops.gradient_saliency_mask(g, beta, compiled=True),
                                              2 * E * s + E, E * s + E),
        ("gradient mask, beta", "reference"): (lambda: reference.gradient_saliency_mask_ref(g, beta),
                                               2 * E * s + E, E * s + E),
        (f"gradient mask, quantile {quantile}", "compiled"): (
            lambda: ops.gradient_saliency_mask(g, beta, quantile, compiled=True), None, None),
        (f"gradient mask, quantile {quantile}", "reference"): (
            lambda: reference.gradient_saliency_mask_ref(g, beta, quantile), None, None),
        ("threshold mask", "compiled"): (lambda: ops.threshold_mask(M, beta, compiled=True), E * s + E, None),
        ("threshold mask", "reference"): (lambda: reference.threshold_mask_ref(M, beta), E * s + E, None),
        ("adaptor mask", "compiled"): (
            lambda: ops.adaptor_saliency_mask(g, weight, bias, adaptor_beta, compiled=True), 2 * E * s + E, E * s + E),
        ("adaptor mask", "reference"): (
            lambda: reference.adaptor_saliency_mask_ref(g, weight, bias, adaptor_beta), 2 * E * s + E, E * s + E),
        ("masked sq norm, forward", "bool kernel"): (lambda: K.masked_sq_norm_bool(g, mask), E * s + E + N * s, None),
        ("masked sq norm, forward", "float kernel"): (lambda: ops.masked_sq_norm(g, mf, compiled=True),
                                                      2 * E * s + N * s, None),
        ("masked sq norm, forward", "reference"): (lambda: (g * mf).pow(2).flatten(1).sum(1), 2 * E * s + N * s,
                                                   None),
        ("masked sq norm, backward", "bool kernel"): (lambda: K.masked_sq_norm_bool_backward(go, g, mask),
                                                      2 * E * s + E + N * s, None),
        ("masked sq norm, backward", "float kernel"): (lambda: K.masked_sq_norm_backward(go, g, mf),
                                                       3 * E * s + N * s, None),
        ("masked sq norm, backward", "reference"): (
            lambda: torch.autograd.grad(out_t, gr, go, retain_graph=True), 3 * E * s + N * s, None),
        # diagnostics: the bool kernels with a uniform mask (no data-dependent branch to mispredict)
        ("masked sq norm, forward", "bool kernel, all-true mask (diagnostic)"): (
            lambda: K.masked_sq_norm_bool(g, ones), E * s + E + N * s, None),
        ("masked sq norm, backward", "bool kernel, all-true mask (diagnostic)"): (
            lambda: K.masked_sq_norm_bool_backward(go, g, ones), 2 * E * s + E + N * s, None),
        # yardsticks: read g + write a g-sized tensor, into a preallocated one and into a fresh one
        ("yardstick: read g, write g-size", "dst.copy_(g) (preallocated)"): (lambda: dst.copy_(g), 2 * E * s, None),
        ("yardstick: read g, write g-size", "g * 2 (fresh output)"): (lambda: g * 2.0, 2 * E * s, None),
    }
    both = gpu_kernel_impls(device) == ["cuda", "triton"]
    if both:
        # both GPU implementations side by side: the ops run the compiled CUDA kernels (forced below),
        # the Triton launchers are called directly (one dispatcher hop less, a few microseconds)
        from jsigr_fast.kernels import saliency_mask as tm

        cases = {(op, "compiled CUDA" if impl == "compiled" else impl): v for (op, impl), v in cases.items()}
        cases.update({
            ("gradient mask, beta", "triton"): (lambda: tm.gradient_saliency_mask(g, beta), 2 * E * s + E, E * s + E),
            (f"gradient mask, quantile {quantile}", "triton"): (lambda: tm.gradient_saliency_mask(g, beta, quantile),
                                                                None, None),
            ("threshold mask", "triton"): (lambda: tm.threshold_mask(M, beta), E * s + E, None),
            ("adaptor mask", "triton"): (lambda: tm.adaptor_saliency_mask(g, weight, bias, adaptor_beta), 2 * E * s + E,
                                         E * s + E),
            ("masked sq norm, forward", "triton"): (lambda: tm.masked_sq_norm_bool(g, mask), E * s + E + N * s, None),
            ("masked sq norm, backward", "triton"): (lambda: tm.masked_sq_norm_bool_backward(go, g, mask),
                                                     2 * E * s + E + N * s, None),
        })
    with using_gpu_kernels("cuda" if both else None):
        samples, inner = interleaved({k: v[0] for k, v in cases.items()}, device, repeats, sample_ms)
    rows = []
    for (op, impl), (_fn, nbytes, floor) in cases.items():
        r = stats(samples[(op, impl)])
        r.update(op=op, impl=impl, shape=list(shape), bytes=nbytes, bytes_floor_cached=floor,
                 calls_per_sample=inner[(op, impl)], gbps=None if nbytes is None else nbytes / r["median_s"] / 1e9)
        rows.append(r)
    for r in rows:
        ref = [q for q in rows if q["op"] == r["op"] and q["impl"] == "reference"]
        r["speedup_vs_reference"] = (ref[0]["median_s"] / r["median_s"]) if (
            ref and r["impl"] != "reference" and "diagnostic" not in r["impl"]) else None
    return rows, errs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--shapes", default=SHAPES, help="comma-separated NxCxHxW")
    p.add_argument("--beta", type=float, default=0.1, help="threshold of the gradient/threshold masks")
    p.add_argument("--adaptor-beta", type=float, default=0.0, help="threshold of the adaptor mask (M in [-1, 1])")
    p.add_argument("--quantile", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=21, help="interleaved rounds = samples per cell")
    p.add_argument("--sample-ms", type=float, default=15.0, help="each sample averages calls lasting about this long")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if not ops.mask_ops_compiled_available(a.device):
        sys.exit(f"the compiled selective-mask ops are not available for {a.device}")
    dtype = DTYPES[a.dtype]
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    t_start = time.perf_counter()
    cond = conditions(a.device)
    cond.update({"dtype": a.dtype, "shapes": [list(s) for s in shapes], "beta": a.beta, "adaptor_beta": a.adaptor_beta,
                 "quantile": a.quantile, "repeats": a.repeats, "sample_ms": a.sample_ms,
                 "threads": torch.get_num_threads(), "loadavg_start": [round(v, 2) for v in os.getloadavg()]})
    if torch.device(a.device).type == "cpu" and hasattr(torch.ops.jsigr_fast, "saliency_mask_cpu_isa"):
        cond["kernel_isa"] = torch.ops.jsigr_fast.saliency_mask_cpu_isa()
    print("conditions:", json.dumps(cond))
    bw_start = copy_bandwidth(a.device, a.repeats)
    print(f"copy bandwidth (read + write of 256 MiB): {bw_start:.1f} GB/s", flush=True)
    rows, checks = [], {}
    for shape in shapes:
        r, errs = bench_shape(shape, dtype, a.device, a.repeats, a.sample_ms, a.beta, a.quantile, a.adaptor_beta)
        for impl, e in errs.items():
            checks[f"{shape} {impl}".strip()] = e
            print(f"  {shape} {impl} checks: {json.dumps(e)}", flush=True)
        rows += r
        for x in r:
            gb = "" if x["gbps"] is None else f"{x['gbps']:6.1f} GB/s"
            sp = "" if x["speedup_vs_reference"] is None else f"{x['speedup_vs_reference']:6.2f}x"
            print(f"  {str(shape):18s} {x['op']:32s} {x['impl']:42s} {x['median_s'] * 1e3:9.3f} ms {gb:12s} {sp}",
                  flush=True)
    bw_end = copy_bandwidth(a.device, a.repeats)
    bw = max(bw_start, bw_end)
    cond["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    cond["wall_s"] = round(time.perf_counter() - t_start, 1)

    lines = [f"### Selective-mask ops — {a.dtype}, {cond['device']}", "",
             f"torch {cond['torch']}, threads {cond['threads']}, kernels {cond.get('kernel_isa', '?')}, commit "
             f"{cond['commit']}, {cond['date']}; beta {a.beta} (adaptor {a.adaptor_beta}), quantile {a.quantile}. "
             f"Each cell: median over {a.repeats} interleaved rounds (p20–p80), a sample averaging calls for "
             f"~{a.sample_ms:g} ms. GB/s = minimal bytes of the op's algorithm / time (E = N·D features, s = "
             f"itemsize: gradient & adaptor mask 2Es + E, threshold mask Es + E, bool norm fwd Es + E, bwd 2Es + E, "
             f"float-mask norm fwd 2Es, bwd 3Es; references charged the same as the op they stand for). Copy "
             f"bandwidth (256 MiB `copy_`, read + write) **{bw:.1f} GB/s** (start {bw_start:.1f}, end "
             f"{bw_end:.1f}; % uses the larger). Load average at start {cond['loadavg_start']}, at end "
             f"{cond['loadavg_end']}; wall {cond['wall_s']:.0f} s.", "",
             "| shape | op | impl | ms | GB/s | % of copy BW | speed-up vs reference |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        gb = "—" if r["gbps"] is None else f"{r['gbps']:.1f}"
        pct = "—" if r["gbps"] is None else f"{100 * r['gbps'] / bw:.0f} %"
        if r["bytes_floor_cached"] is not None and r["gbps"] is not None:
            pct += f" ({100 * r['bytes_floor_cached'] / r['median_s'] / 1e9 / bw:.0f} % at 1 read)"
        sp = "" if r["speedup_vs_reference"] is None else f"{r['speedup_vs_reference']:.2f}x"
        lines.append(f"| {tuple(r['shape'])} | {r['op']} | {r['impl']} | {r['median_s'] * 1e3:.3f} "
                     f"[{r['p20_s'] * 1e3:.3f}–{r['p80_s'] * 1e3:.3f}] | {gb} | {pct} | {sp} |")
    lines += ["", "Correctness first (compiled vs reference on the same inputs; norms vs a float64 reference on the "
              "upcast inputs, max |err| / max |ref|):", ""]
    for k, e in checks.items():
        adapt = f"adaptor {e['adaptor_mask_mismatches']}"
        if "adaptor_mismatch_max_abs_M_minus_beta" in e:
            adapt += f" (all within {e['adaptor_mismatch_max_abs_M_minus_beta']:.1e} of beta)"
        lines.append(
            f"- {k}: {'OK' if e['ok'] else 'FAILED'} — mask mismatches: gradient {e['gradient_mask_mismatches']}, "
            f"quantile {e['gradient_mask_quantile_mismatches']}, threshold {e['threshold_mask_mismatches']}, {adapt} "
            f"(fraction penalised: gradient {e['mask_fraction_true']:.3f}, adaptor {e['adaptor_fraction_true']:.3f}); "
            f"norm fwd bool {e['norm_fwd_bool_rel']:.1e}, float kernel {e['norm_fwd_float_kernel_rel']:.1e}, torch "
            f"{e['norm_fwd_torch_rel']:.1e}; bwd bool {e['norm_bwd_bool_rel']:.1e}, float kernel "
            f"{e['norm_bwd_float_kernel_rel']:.1e}, torch {e['norm_bwd_torch_rel']:.1e}")
    publish(lines, a.out, f"mask_{torch.device(a.device).type}_{a.dtype}",
            {"conditions": cond, "copy_gbps": bw, "copy_gbps_start": bw_start, "copy_gbps_end": bw_end,
             "rows": rows, "checks": checks})
    if not all(e["ok"] for e in checks.values()):
        sys.exit("correctness check FAILED (see above)")


if __name__ == "__main__":
    main()
