"""Does carrying several Hutchinson probes through one forward pass pay? J-SIGR with
``jacobian="hutchinson"`` and ``n_proj`` probes, backend="fused", with the extra probes batched into one
``torch.func.vmap``-ed forward-mode pass (jsigr_fast.fused.BATCH_PROBES on) against one forward-mode pass
per probe (off, the reference's structure); the reference backend's step alongside for scale.

    python bench/bench_probes.py --out bench/results                      # CPU, ResNet-20, batch 128
    python bench/bench_probes.py --device cuda --out bench/results        # then set BATCH_PROBES["cuda"]

Floor (SPEC.md cost model, conv-FLOP units, standard step = 3): the first probe rides on the training
forward (J-SIGR Hutchinson = 11), so the first batched pass carries probes 2..k (k >= 3); every further probe needs at least its tangent forward (1) and that
tangent's backward (2), so 11 + 3(k - 1). One pass per probe pays a primal forward and its backward on
top of each (6 per extra probe); the batched pass pays them once (11 + 3 + 3(k - 1) for k >= 2).

Both variants give the same loss and parameter gradients; the script checks that first (float64 copy,
small batch). Results: ``<out>/probes_<device>_<model>_b<batch>_<dtype>.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from steps import (FLOOR_UNITS, add_step_arguments, apply_step_arguments, conditions, make_setup,  # noqa: E402
                   publish, time_steps)

import jsigr_fast  # noqa: E402
from jsigr_fast import fused  # noqa: E402


class batch_probes:
    """``with batch_probes(device, on):`` BATCH_PROBES for ``device`` set to 2 (on) or None (off), then restored."""

    def __init__(self, device, on: bool):
        self.dev, self.on = torch.device(device).type, on

    def __enter__(self):
        self.before = fused.BATCH_PROBES.get(self.dev)
        fused.BATCH_PROBES[self.dev] = 2 if self.on else None

    def __exit__(self, *exc):
        fused.BATCH_PROBES[self.dev] = self.before
        return False


def make_loss(n_proj: int, backend: str, batched: bool, seed: int = 0):
    def loss(model, x, y):
        gen = torch.Generator(device=x.device).manual_seed(seed)
        with batch_probes(x.device, batched):
            return jsigr_fast.loss(model, x, y, jacobian="hutchinson", n_proj=n_proj, backend=backend, generator=gen)

    return loss


def floor_units(n_proj: int) -> int:
    return FLOOR_UNITS["jsigr_hutchinson"] + 3 * (n_proj - 1)


def check_same(model, x, y, n_proj: int):
    """Batched and per-probe passes: same loss and parameter gradients (float64, 8 samples)."""
    m64, x64, y64 = copy.deepcopy(model).double(), x[:8].double(), y[:8]
    out = []
    for batched in (False, True):
        m = copy.deepcopy(m64)
        loss = make_loss(n_proj, "fused", batched)(m, x64, y64)
        grads = torch.autograd.grad(loss, [p for p in m.parameters()], allow_unused=True, materialize_grads=True)
        out.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = out
    torch.testing.assert_close(l1, l0, rtol=1e-9, atol=0)
    scale = max(g.abs().max().item() for g in g0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11 * scale)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(p)
    p.add_argument("--n-proj", default="1,2,3,4", help="probe counts to time")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the reference backend's step (default on)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median over rounds is reported")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)
    if "fused" not in jsigr_fast.available_backends(a.device):
        raise SystemExit(f"the fused backend is not available on {a.device}: {jsigr_fast.extension_error()}")
    dtype = apply_step_arguments(a)
    counts = [int(v) for v in a.n_proj.split(",")]
    if not counts or min(counts) < 1:
        raise SystemExit(f"--n-proj: expected positive probe counts, got {a.n_proj!r}")
    model, opt, x, y = make_setup(a.model, a.batch, device=a.device, dtype=dtype)
    cond = conditions(a.device)
    cond.update({"model": a.model, "batch": a.batch, "dtype": a.dtype, "rounds": a.rounds, "repeats": a.repeats,
                 "batch_probes_default": fused.BATCH_PROBES.get(torch.device(a.device).type)})
    cond["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    print("conditions:", json.dumps(cond))
    for k in counts:
        if k > 2:
            check_same(model, x, y, k)
    print("batched and per-probe passes agree (float64 loss and gradients, rtol 1e-9)")

    variants = {}
    for k in counts:
        variants[(k, "per-probe")] = make_loss(k, "fused", False)
        if k > 2:  # the first probe rides on the training forward: batching needs two further ones
            variants[(k, "batched")] = make_loss(k, "fused", True)
        if a.reference:
            variants[(k, "reference")] = make_loss(k, "reference", False)
    times = {key: [] for key in variants}
    std, peak = [], {}
    for r in range(a.rounds):
        std.append(time_steps(model, opt, lambda m, xx, yy: torch.nn.functional.cross_entropy(m(xx), yy), x, y,
                              repeats=a.repeats, device=a.device)["median_s"])
        for key, fn in variants.items():
            res = time_steps(model, opt, fn, x, y, repeats=a.repeats, device=a.device)
            times[key].append(res["median_s"])
            if "peak_mem_gib" in res:
                peak[key] = res["peak_mem_gib"]
            print(f"  round {r + 1}/{a.rounds} {key} {times[key][-1] * 1e3:.0f} ms", flush=True)
    cond["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]

    def med(v):
        return float(torch.tensor(v, dtype=torch.float64).median())

    s = med(std)
    mem = bool(peak)
    lines = [f"### Hutchinson probes: one batched pass vs one pass per probe — {a.model}, batch {a.batch}, "
             f"{a.dtype}, {cond['device']}", "",
             f"torch {cond['torch']}, threads {torch.get_num_threads()}, commit {cond['commit']}, {cond['date']}; "
             f"median over {a.rounds} interleaved rounds of the median of {a.repeats} steps; J-SIGR, "
             f"jacobian=\"hutchinson\", backend=\"fused\" unless marked. Standard step {s * 1e3:.0f} ms. "
             f"Load average at start {cond['loadavg_start']}, at end {cond['loadavg_end']}.", "",
             "| probes | floor (units) | per-probe passes (ms) | × floor | batched pass (ms) | × floor | "
             "per-probe / batched (median [min–max] of rounds) | reference (ms) |" + (" peak GiB per-probe / batched |" if mem else ""),
             "|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if mem else "")]
    for k in counts:
        fl = floor_units(k)
        t0 = med(times[(k, "per-probe")])
        row = f"| {k} | {fl} | {t0 * 1e3:.0f} | {t0 / s * 3 / fl:.2f} |"
        if (k, "batched") in times:
            t1 = med(times[(k, "batched")])
            ratios = [u / v for u, v in zip(times[(k, "per-probe")], times[(k, "batched")])]
            row += (f" {t1 * 1e3:.0f} | {t1 / s * 3 / fl:.2f} | **{med(ratios):.2f}x** "
                    f"[{min(ratios):.2f}–{max(ratios):.2f}] |")
        else:
            row += " — | — | (at most one probe outside the training forward: nothing to batch) |"
        row += f" {med(times[(k, 'reference')]) * 1e3:.0f} |" if (k, "reference") in times else " — |"
        if mem:
            pb = peak.get((k, "batched"))
            row += f" {peak[(k, 'per-probe')]:.2f} / {'—' if pb is None else f'{pb:.2f}'} |"
        lines.append(row)
    lines += ["", "× floor: the step time in standard-step units (standard = 3) over the floor "
              "11 + 3(k − 1); see the script's docstring."]
    publish(lines, a.out, f"probes_{torch.device(a.device).type}_{a.model}_b{a.batch}_{a.dtype}",
            {"conditions": cond, "standard_s": std, "peak_mem_gib": {str(k): v for k, v in peak.items()},
             "times": {str(k): v for k, v in times.items()}})


if __name__ == "__main__":
    main()
