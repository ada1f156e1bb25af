"""The loss head of the fused J-SIGR step, measured in isolation: does fusing it pay?

    python bench/bench_loss_head.py --out bench/results                 # CPU
    python bench/bench_loss_head.py --device cuda --out bench/results   # a GPU session: the CUDA and
                                                                        # Triton kernels side by side

Three pieces of the step whose size is N x K (K = 10..1000 classes), not N x D:

* **CE + cotangent**: ATen's ``F.cross_entropy(reduction="none")`` with the input-gradient cotangent
  produced by autograd (log_softmax, nll_loss, their backward, and in the final backward their double
  backward) vs ``ops.cross_entropy_cotangent`` (one pass; one backward node). Timed as the step uses
  it, on a stand-in network ``logits = tanh(feat @ W1) @ W2`` (feat: (N, 64)) so the graph has a
  cotangent to carry: forward, ``g = autograd.grad(..., create_graph=True)``, ``(ce + |g|^2).backward()``.
  Reported with the stand-in's own cost subtracted would be misleading, so the table gives both
  variants' full time and their difference per step.
* **unit-sphere draws** ``v = randn(N, K); v / ||v||`` (the projection estimator's, on the
  generator's device; with a generator the draw order is the library's contract, so only the
  normalisation could be fused: one op fewer).
* **per-sample norms** ``K * ||u_n||^2`` of the projection VJP ``u`` (N x D): ``u.pow(2).sum(1)``
  forward + backward vs the compiled ``ops.masked_sq_norm(u, None)``.

Correctness is checked first (max |difference| against the reference, float32). Each timing is the
median of ``--repeats`` calls (p20-p80 in brackets); the rows of one table run interleaved in rounds.
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
from steps import conditions, publish  # noqa: E402

from jsigr_fast import ops, reference  # noqa: E402


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, repeats):
    for _ in range(3):
        fn()
    _sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    t = torch.tensor(ts, dtype=torch.float64)
    return {"median_ms": float(t.quantile(0.5)) * 1e3, "p20_ms": float(t.quantile(0.2)) * 1e3,
            "p80_ms": float(t.quantile(0.8)) * 1e3}


def _gpu_impls(dev):
    """On a GPU both implementations of the compiled ops (the CUDA kernels of csrc/cuda and the Triton
    ones of kernels/), timed side by side; elsewhere the one there is (None)."""
    if torch.device(dev).type != "cuda" or ops.gpu_kernels() is None:
        return [None]
    from importlib.util import find_spec

    return ["cuda", "triton"] if find_spec("triton") is not None else ["cuda"]


def _use(impl):
    if impl is not None:
        ops.use_gpu_kernels(impl)


def head_step(feat, w1, w2, y, fused):
    h = torch.tanh(feat @ w1)
    logits = h @ w2
    if fused:
        per, r = ops.cross_entropy_cotangent(logits, y, compiled=True)
        (g,) = torch.autograd.grad(logits, feat, r, create_graph=True)
    else:
        per = F.cross_entropy(logits, y, reduction="none")
        (g,) = torch.autograd.grad(per.sum(), feat, create_graph=True)
    loss = per.mean() + 0.5 * g.pow(2).sum(1).mean()
    loss.backward()
    return loss


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--classes", default="10,100,1000")
    p.add_argument("--features", type=int, default=3072, help="D of the per-sample norm (CIFAR: 3072)")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev, n = a.device, a.batch
    cond = conditions(dev)
    cond.update({"batch": n, "features": a.features, "threads": torch.get_num_threads(), "rounds": a.rounds,
                 "repeats": a.repeats, "loadavg_start": [round(v, 2) for v in os.getloadavg()]})
    print("conditions:", json.dumps(cond))
    g = torch.Generator(device="cpu").manual_seed(0)
    rows, checks = [], []
    impls = _gpu_impls(dev)
    cond["gpu_kernels"] = [i for i in impls if i]
    for k in [int(c) for c in a.classes.split(",")]:
        feat = torch.randn(n, 64, device=dev, generator=None).requires_grad_(True)
        w1 = (torch.randn(64, 64, device=dev) / 8).requires_grad_(True)
        w2 = (torch.randn(64, k, device=dev) / 8).requires_grad_(True)
        y = torch.randint(0, k, (n,), device=dev)
        z = torch.randn(n, k, device=dev)
        lr, rr = reference.cross_entropy_cotangent_ref(z, y)
        u = torch.randn(n, a.features, device=dev)
        ug = u.clone().requires_grad_(True)
        aten = {
            ("CE + cotangent, fwd + create_graph VJP + bwd", "aten"): lambda: head_step(feat, w1, w2, y, False),
            ("CE + cotangent, forward only", "aten"): lambda: (F.cross_entropy(z, y, reduction="none"),
                                                               torch.softmax(z, 1) - F.one_hot(y, k)),
            ("unit-sphere draw (generator)", "randn + norm + div"): lambda: reference.unit_sphere(
                n, k, like=z, generator=g),
            ("unit-sphere draw (generator)", "randn only"): lambda: torch.randn((n, k), generator=g).to(dev),
            ("per-sample norm K||u||^2, fwd + bwd", "pow + sum"): lambda: (
                k * ug.reshape(n, -1).pow(2).sum(1)).sum().backward(),
        }
        # the compiled ops, under each GPU implementation in turn (one switch per round, not per call)
        groups = [(None, aten)]
        for impl in impls:
            suffix = f" ({impl})" if impl else ""
            groups.append((impl, {
                ("CE + cotangent, fwd + create_graph VJP + bwd", "fused op" + suffix): lambda: head_step(
                    feat, w1, w2, y, True),
                ("CE + cotangent, forward only", "fused op" + suffix): lambda: ops.cross_entropy_cotangent(
                    z, y, compiled=True),
                ("per-sample norm K||u||^2, fwd + bwd", "compiled" + suffix): lambda: (
                    k * ops.masked_sq_norm(ug, None, compiled=True)).sum().backward(),
            }))
            _use(impl)
            lf, rf = ops.cross_entropy_cotangent(z, y, compiled=True)
            checks.append(f"K={k}{suffix}: loss {float((lf - lr).abs().max()):.1e}, "
                          f"cotangent {float((rf - rr).abs().max()):.1e}")
        samples = {key: [] for _, cases in groups for key in cases}
        for _ in range(a.rounds):
            for impl, cases in groups:
                _use(impl)
                for key, fn in cases.items():
                    samples[key].append(timeit(fn, dev, a.repeats))
        pieces = list(dict.fromkeys(what for what, _ in samples))  # each piece's rows together
        for (what, impl), res in sorted(samples.items(), key=lambda kv: pieces.index(kv[0][0])):
            med = sorted(res, key=lambda r: r["median_ms"])[len(res) // 2]
            rows.append(dict(med, K=k, what=what, impl=impl))
            print(f"K={k:5d} {what:48s} {impl:20s} {med['median_ms'] * 1e3:9.1f} us", flush=True)

    lines = [f"### Loss head pieces — batch {n}, float32, {cond['device']}", "",
             f"torch {cond['torch']}, threads {cond['threads']}, commit {cond['commit']}, {cond['date']}; each cell "
             f"the median over {a.rounds} interleaved rounds of the median of {a.repeats} calls (p20–p80). "
             f"Load average at start {cond['loadavg_start']}, at end {[round(v, 2) for v in os.getloadavg()]}.",
             "", "| K | piece | implementation | µs | p20–p80 |", "|---:|---|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['K']} | {r['what']} | {r['impl']} | {r['median_ms'] * 1e3:.1f} | "
                     f"{r['p20_ms'] * 1e3:.0f}–{r['p80_ms'] * 1e3:.0f} |")
    lines += ["", "Correctness first (max |fused − reference|, float32): " + "; ".join(checks)]
    publish(lines, a.out, f"loss_head_{torch.device(dev).type}_b{n}_float32_t{torch.get_num_threads()}",
            {"conditions": cond, "results": rows, "checks": checks})
    return rows


if __name__ == "__main__":
    main()
