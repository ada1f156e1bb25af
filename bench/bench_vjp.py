"""Does batching the VJPs pay? One ``autograd.grad(..., is_grads_batched=True)`` over the stacked
cotangents ``[p - onehot(y), v_1..v_n]`` against n+1 separate create-graph VJPs, inside a full
J-SIGR-style step (forward, VJPs with graph, penalty + projection terms, backward, SGD step).

    python bench/bench_vjp.py --out bench/results                    # CPU, ResNet-20, batch 128
    python bench/bench_vjp.py --device cuda --dtype bfloat16 --out bench/results

Layer rules: ``native`` (ATen autograd everywhere), ``fused`` (jsigr_fast.fused.fused_layers: fused
BatchNorm, conv2d / ReLU double-backward rules; under the vmapped backward of is_grads_batched the
conv rule falls back to ATen's differentiable convolution_backward, see jsigr_fast.fused._batched).
Both variants compute the same loss; the script checks that first. Results:
``<out>/vjp_<device>_<model>_b<batch>_<dtype>.md``; jsigr_fast.fused.BATCH_VJPS records the decision.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from steps import add_step_arguments, apply_step_arguments, conditions, make_setup, publish, time_steps  # noqa: E402

from jsigr_fast import fused, reference  # noqa: E402


def make_loss(n_proj: int, batched: bool, layers: str, seed: int = 0):
    def loss(model, x, y):
        ctx = fused.fused_layers() if layers == "fused" else contextlib.nullcontext()
        gen = torch.Generator(device=x.device).manual_seed(seed)
        with ctx:
            xg, logits = reference.forward(model, x, y)
            n, k = logits.shape
            ce = F.cross_entropy(logits, y)
            r = torch.softmax(logits, dim=1) - F.one_hot(y, k).to(logits.dtype)
            vs = [reference.unit_sphere(n, k, like=logits, generator=gen) for _ in range(n_proj)]
            if batched:
                grads = list(reference.vjp(logits, xg, torch.stack([r] + vs), is_grads_batched=True).unbind(0))
            else:
                grads = [reference.vjp(logits, xg, c) for c in [r] + vs]
            sig = grads[0].reshape(n, -1).pow(2).sum(1).mean()
            jac = sum(k * g.reshape(n, -1).pow(2).sum(1) for g in grads[1:]).mean() / n_proj
        return ce + 0.5 * sig + 0.5 * jac

    return loss


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(p)
    p.add_argument("--n-proj", default="1,2")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median over rounds is reported")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    dtype = apply_step_arguments(a)
    model, opt, x, y = make_setup(a.model, a.batch, device=a.device, dtype=dtype)
    cond = conditions(a.device)
    cond.update({"model": a.model, "batch": a.batch, "dtype": a.dtype, "rounds": a.rounds})
    cond["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    print("conditions:", json.dumps(cond))

    variants = {}
    for n_proj in (int(v) for v in a.n_proj.split(",")):
        for layers in ("native", "fused"):
            for batched in (False, True):
                variants[(n_proj, layers, batched)] = make_loss(n_proj, batched, layers)
    # same loss either way (float64 copy, small batch)
    import copy
    m64, x64, y64 = copy.deepcopy(model).double(), x[:8].double(), y[:8]
    for (n_proj, layers, batched), fn in variants.items():
        if batched:
            ref = variants[(n_proj, layers, False)](copy.deepcopy(m64), x64, y64)
            got = fn(copy.deepcopy(m64), x64, y64)
            assert torch.allclose(ref, got, rtol=1e-9), (n_proj, layers, float(ref), float(got))

    times = {k: [] for k in variants}
    std = []
    for _ in range(a.rounds):
        std.append(time_steps(model, opt, lambda m, xx, yy: F.cross_entropy(m(xx), yy), x, y, repeats=a.repeats,
                              device=a.device)["median_s"])
        for key, fn in variants.items():
            times[key].append(time_steps(model, opt, fn, x, y, repeats=a.repeats, device=a.device)["median_s"])
            print(f"  {key} {times[key][-1] * 1e3:.0f} ms", flush=True)
    med = lambda v: float(torch.tensor(v).median())  # noqa: E731
    s = med(std)
    lines = [f"### Batched vs separate VJPs — {a.model}, batch {a.batch}, {a.dtype}, {cond['device']}", "",
             f"torch {cond['torch']}, threads {torch.get_num_threads()}, commit {cond['commit']}, {cond['date']}; "
             f"median over {a.rounds} interleaved rounds of the median of {a.repeats} steps. Standard step {s * 1e3:.0f} ms.",
             "", "| projections | layer rules | separate VJPs (ms) | one batched VJP (ms) | batched / separate |",
             "|---:|---|---:|---:|---:|"]
    for n_proj in sorted({k[0] for k in variants}):
        for layers in ("native", "fused"):
            t0, t1 = med(times[(n_proj, layers, False)]), med(times[(n_proj, layers, True)])
            lines.append(f"| {n_proj} | {layers} | {t0 * 1e3:.0f} | {t1 * 1e3:.0f} | {t1 / t0:.2f} |")
    publish(lines, a.out, f"vjp_{torch.device(a.device).type}_{a.model}_b{a.batch}_{a.dtype}",
            {"conditions": cond, "standard_s": std, "times": {str(k): v for k, v in times.items()}})


if __name__ == "__main__":
    main()
