"""Seconds per training step, side by side in one run: standard CE vs the regularized losses.

    python bench/bench_step.py --out bench/results                  # CPU default configuration
    python bench/bench_step.py --model resnet20 --batch 128 --device cuda --out bench/results

Prints a table with each step as a multiple of the standard step and of its FLOP floor
(bench/steps.py), and writes ``<out>/step_<device>_<model>_b<batch>.{json,md}`` with the
conditions (device, versions, threads, shapes, dtype, commit). ``--profile`` adds the share of
time spent in the top autograd ops of the J-SIGR step (e.g. BatchNorm's double backward).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from steps import (FLOOR_UNITS, add_step_arguments, apply_step_arguments, conditions, make_methods,  # noqa: E402
                   make_setup, publish, time_graphed_steps, time_steps, train_step)


def profile_top_ops(model, opt, loss_fn, x, y, k=8):
    """Inclusive time of the top autograd nodes (e.g. NativeBatchNormBackwardBackward0, whose work
    shows up as many small mul/sum/sub kernels in an aten-level profile) and of the top aten ops."""
    from torch.profiler import ProfilerActivity, profile

    train_step(model, opt, loss_fn, x, y)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    dev = x.is_cuda
    if dev:
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        train_step(model, opt, loss_fn, x, y)
        if dev:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    events = prof.key_averages()
    self_attr = "self_device_time_total" if dev else "self_cpu_time_total"
    incl_attr = "device_time_total" if dev else "cpu_time_total"
    total = sum(getattr(e, self_attr) for e in events)
    prefix = "autograd::engine::evaluate_function: "
    nodes = sorted((e for e in events if e.key.startswith(prefix)), key=lambda e: getattr(e, incl_attr), reverse=True)
    aten = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: getattr(e, self_attr), reverse=True)
    out = {"autograd_nodes": [(e.key[len(prefix):], getattr(e, incl_attr) / max(total, 1)) for e in nodes[:k]],
           "aten_self": [(e.key, getattr(e, self_attr) / max(total, 1)) for e in aten[:k]]}
    if dev:
        # how much of the step's wall time the GPU computes (kernels on one stream do not overlap): the
        # rest it waits for the host (Python, autograd, launches, syncs); launch-bound when this is low
        # (measured on the device only: an older profiler without device events leaves it out)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        if kernels:
            out["device_ms"] = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
            out["kernels"] = len(kernels)
            out["profiled_wall_ms"] = wall_us / 1e3
    return out


def format_top_ops(top: dict, what: str, step_ms: float | None = None) -> list[str]:
    """Markdown lines for :func:`profile_top_ops`'s result; ``step_ms``: the step's unprofiled time, against
    which the GPU's busy share is given (the profiler slows the host more than the kernels)."""
    lines = ["", f"Share of {what}'s time, by autograd node (inclusive) and by aten op (self):", ""]
    lines += [f"- node `{k}`: {v * 100:.1f} %" for k, v in top["autograd_nodes"]]
    lines += [f"- op `{k}`: {v * 100:.1f} %" for k, v in top["aten_self"]]
    if "device_ms" in top:
        shares = [f"{top['device_ms'] / top['profiled_wall_ms'] * 100:.0f} % of the profiled step's "
                  f"{top['profiled_wall_ms']:.1f} ms"]
        if step_ms:
            shares.insert(0, f"{top['device_ms'] / step_ms * 100:.0f} % of the {step_ms:.1f} ms step")
        lines += ["", f"GPU kernels and copies: {top['device_ms']:.1f} ms in {top['kernels']} of them, "
                      f"{'; '.join(shares)}. The rest of the time the GPU waits for the host."]
    return lines


def graph_table(results: dict) -> list[str]:
    """The steps captured as CUDA graphs, beside their eager times (--cuda-graph)."""
    lines = ["", "Captured as CUDA graphs (jsigr_fast.graphed_step; × standard and × floor against the graphed "
             "standard step):", "",
             "| method | graphed ms/step | × standard | × floor | eager / graphed |", "|---|---:|---:|---:|---:|"]
    for r in results.values():
        g = r.get("graph", {})
        if "error" in g:
            lines.append(f"| {r['label']} | not capturable: {g['error']} | | | |")
        elif "median_s" in g:
            ms = f"{g['median_s'] * 1e3:.1f} [{g['p20_s'] * 1e3:.0f}–{g['p80_s'] * 1e3:.0f}]"
            lines.append(f"| {r['label']} | {ms} "
                         f"| {g.get('x_standard', float('nan')):.2f} | {g.get('x_floor', float('nan')):.2f} "
                         f"| {g.get('speedup_vs_eager', float('nan')):.2f}x |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(p, threads=False)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--methods", default="standard,double_backprop,double_backprop_fused,jsigr,jsigr_fused,jsigr_fd,"
                   "jsigr_fd_fused,jsigr_hutchinson,jsigr_hutchinson_fused,pgd_at7")
    p.add_argument("--backend", default="reference")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--cuda-graph", action="store_true",
                   help="also time each step captured as a CUDA graph (jsigr_fast.graphed_step), side by side")
    a = p.parse_args(argv)
    if a.cuda_graph and torch.device(a.device).type != "cuda":
        p.error("--cuda-graph needs --device cuda")

    dtype = apply_step_arguments(a)
    model, opt, x, y = make_setup(a.model, a.batch, device=a.device, dtype=dtype, channels_last=a.channels_last)
    methods = make_methods(model.input_shape, backend=a.backend, device=a.device, default_rng=a.cuda_graph)
    names = [m.strip() for m in a.methods.split(",") if m.strip()]
    unknown = [n for n in names if n not in methods]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {sorted(methods)}")
    if "standard" not in names:
        names.insert(0, "standard")

    cond = conditions(a.device)
    cond.update({"model": a.model, "batch": a.batch, "input_shape": list(model.input_shape), "dtype": a.dtype,
                 "channels_last": a.channels_last, "backend": a.backend})
    print("conditions:", json.dumps(cond))
    results = {}
    for name in names:
        m = methods[name]
        torch.manual_seed(0)
        r = time_steps(model, opt, m.loss, x, y, warmup=a.warmup, repeats=a.repeats, device=a.device)
        results[name] = dict(r, label=m.label, floor_units=FLOOR_UNITS[m.floor])
        print(f"  {m.label:40s} {r['median_s'] * 1e3:9.1f} ms/step", flush=True)
        if a.cuda_graph:
            torch.manual_seed(0)
            g = time_graphed_steps(model, opt, m.loss, x, y, repeats=a.repeats, device=a.device)
            results[name]["graph"] = g
            print(f"  {m.label + ' (CUDA graph)':40s} " +
                  (f"{g['median_s'] * 1e3:9.1f} ms/step" if "error" not in g else g["error"]), flush=True)
    std = results["standard"]["median_s"]
    for r in results.values():
        r["x_standard"] = r["median_s"] / std
        # floor in seconds: the standard step is 3 units
        r["x_floor"] = r["median_s"] / (std * r["floor_units"] / 3)
    std_graph = results["standard"].get("graph", {}).get("median_s")
    for r in results.values():
        g = r.get("graph", {})
        if "median_s" in g and std_graph:
            g["x_standard"] = g["median_s"] / std_graph  # against the graphed standard step: like with like
            g["x_floor"] = g["median_s"] / (std_graph * r["floor_units"] / 3)
            g["speedup_vs_eager"] = r["median_s"] / g["median_s"]
    if a.profile and "jsigr" in names:
        results["jsigr"]["top_ops"] = profile_top_ops(model, opt, methods["jsigr"].loss, x, y)

    lines = [f"### Seconds per training step — {a.model}, batch {a.batch}, {a.dtype}, {cond['device']}", "",
             f"torch {cond['torch']}, threads {cond['threads']}, commit {cond['commit']}, {cond['date']}; "
             f"median of {a.repeats} steps after {a.warmup} warm-up (p20–p80 in brackets).", "",
             "| method | ms/step | × standard | floor (units) | × floor |", "|---|---:|---:|---:|---:|"]
    for r in results.values():
        lines.append(f"| {r['label']} | {r['median_s'] * 1e3:.1f} [{r['p20_s'] * 1e3:.0f}–{r['p80_s'] * 1e3:.0f}] "
                     f"| {r['x_standard']:.2f} | {r['floor_units']} | {r['x_floor']:.2f} |")
    if a.cuda_graph:
        lines += graph_table(results)
    if "top_ops" in results.get("jsigr", {}):
        lines += format_top_ops(results["jsigr"]["top_ops"], "the J-SIGR step")
    publish(lines, a.out, f"step_{torch.device(a.device).type}_{a.model}_b{a.batch}_{a.dtype}",
            {"conditions": cond, "results": results})
    return results


if __name__ == "__main__":
    main()
