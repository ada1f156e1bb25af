"""Peak memory of one training step per method, against the standard step's (the ≤ 2× target).

    python bench/bench_memory.py --out bench/results                      # CPU, ResNet-20, batch 128
    python bench/bench_memory.py --device cuda --out bench/results
    python bench/bench_memory.py --model resnet18 --batch 16 --dtype bfloat16 --channels-last --policies cuda \
        --out bench/results     # the fused backend with the GPU's settings, counted on the CPU

What is measured: the most tensor memory the step holds *above the resting state* (the weights,
their optimizer state and the batch, which every method shares), i.e. the activations, the graphs
kept for the backward and its temporaries. On CUDA, ``torch.cuda.max_memory_allocated`` minus the
memory allocated when the step starts (the gradients of the previous step are freed by
``zero_grad(set_to_none=True)`` inside the step). On the CPU, which keeps no allocator statistics,
torch's profiler with ``profile_memory=True``: every allocation and free of the step in time order,
matched by address and summed from the moment the previous step's gradients are freed; the running
total's maximum is the peak (it returns to ~0 at the end: tests/test_bench_smoke.py checks that, and
the peak against an allocation of known size). Each method gets one untimed step first, so lazily
built state (JARN's adaptor, the optimizer's momentum) is resting state too.

Why J-SIGR sits above 2× (SPEC cost model): its loss keeps the forward's graph (1×) plus the graphs
of two create_graph VJPs at the same x, the input-gradient penalty's and the Jacobian projection's,
each holding activation-sized cotangents for the double backward (2× for the reference; about half of
that where the fused batch norm rebuilds its grad_y, see below). The ablation
``jsigr_eager_fused`` (bench/steps.py ``fused_jsigr_eager_penalty``: the input-gradient penalty's
parameter gradients taken inside the loss call, so one such VJP graph is alive at a time) measures
how much of that a split backward buys back; ``bench_fused.py --pairs jsigr --ablation eager`` times it.
Of each such set, one tensor per batch norm is its ``grad_y``; ``jsigr_fast.ops.BN_REBUILD_GRAD_Y`` rebuilds it
from the ``grad_x`` the conv before it keeps anyway: ``jsigr_bn_keep_fused`` / ``jsigr_bn_rebuild_fused`` are the
fused J-SIGR step with that forced off / on (``bench_fused.py --ablation bn_rebuild`` times it);
``jsigr_bn_rebuild_torch_fused`` forms the rebuilt grad_y with torch ops (``ops.rebuild_grad_y``, an activation-sized
temporary at the double backward) instead of the kernel that never forms it (``--ablation rebuild_torch``).
fd needs no double backward and differentiates each perturbed forward's graph as soon as its term is
computed (jsigr_fast.finite_difference.FREE_EARLY), so it holds about two forwards' graphs; the
ablation ``jsigr_fd_kept`` keeps them all to the end (``--ablation fd_kept`` times it).

Results: ``<out>/memory_<device>_<model>_b<batch>_<dtype>[_cl][_<policies>_policies].{md,json,png}`` (the png:
bars of the table).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_overhead import device_policies  # noqa: E402
from steps import (FLOOR_UNITS, add_step_arguments, apply_step_arguments, conditions, make_methods,  # noqa: E402
                   make_setup, publish, sync, train_step)

DEFAULT = ("standard,double_backprop,double_backprop_fused,jsigr,jsigr_fused,jsigr_bn_keep_fused,"
           "jsigr_bn_rebuild_fused,jsigr_bn_rebuild_torch_fused,jsigr_keep_input_fused,jsigr_recompute_input_fused,"
           "jsigr_rebuild_recompute_fused,"
           "jsigr_eager_fused,jsigr_hutchinson,"
           "jsigr_hutchinson_fused,jsigr_fd,jsigr_fd_fused,jsigr_fd_kept,pgd_at7")
MIB = 2 ** 20


def _allocation_events(prof):
    """(time ns, address, bytes) of every CPU allocation (+) and free (-) the profiler recorded."""
    from torch._C._profiler import _EventType

    out, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation and node.typed[1].device.type == "cpu":
            out.append((node.start_time_ns, node.typed[1].ptr, node.typed[1].alloc_size))
    return sorted(out)


def cpu_step_peak(model, opt, loss_fn, x, y) -> tuple[int, int]:
    """(peak, net) bytes of one step above its starting point, from the profiler's allocation events.

    Frees are matched to allocations by address. Only a free of a block allocated inside this step
    counts: torch's CPU allocator remembers block sizes by address across profiler sessions and never
    forgets one freed while no profiler runs, so a block allocated outside any session at a reused
    address is "freed" with a stale size (the cause of a flaky net of -0.1 MiB in CI). The one
    pre-existing memory the step frees on purpose, the previous gradients, is counted freed at the
    start with its true size.
    """
    from torch.profiler import ProfilerActivity, profile

    stale = {}
    for p in model.parameters():
        if p.grad is not None:
            stale[p.grad.untyped_storage().data_ptr()] = p.grad.untyped_storage().nbytes()
    gc.collect()  # no collection of older garbage inside the step
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            train_step(model, opt, loss_fn, x, y)
    finally:
        if gc_was_enabled:
            gc.enable()
    return allocation_peak(_allocation_events(prof), start=-sum(stale.values()))


def allocation_peak(events, start: int = 0) -> tuple[int, int]:
    """(peak, net) bytes of ``events`` (time, address, +/- bytes) from ``start``: frees matched to the
    allocations of the same address among them (a free of an older block does not count)."""
    live = {}
    total = peak = start
    for _, ptr, nbytes in events:
        if nbytes > 0:
            live[ptr] = nbytes
            total += nbytes
        elif ptr in live:
            total -= live.pop(ptr)
        peak = max(peak, total)
    return peak, total


def cuda_step_peak(model, opt, loss_fn, x, y) -> tuple[int, int]:
    sync(x.device)
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train_step(model, opt, loss_fn, x, y)
    sync(x.device)
    return torch.cuda.max_memory_allocated() - start, torch.cuda.memory_allocated() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(p)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--methods", default=DEFAULT)
    p.add_argument("--policies", default=None, choices=["cpu", "cuda"],
                   help="on the CPU, run the fused backend with that device's per-device settings (as "
                        "bench_overhead.py does): what a GPU's step holds, counted here")
    a = p.parse_args(argv)
    if a.policies and a.device != "cpu":
        p.error("--policies applies to --device cpu only")
    dtype = apply_step_arguments(a)
    model, opt, x, y = make_setup(a.model, a.batch, device=a.device, dtype=dtype, channels_last=a.channels_last)
    methods = make_methods(model.input_shape, backend="reference", device=a.device)
    names = [n for n in a.methods.split(",") if n]
    unknown = [n for n in names if n not in methods]
    if unknown:
        p.error(f"unknown or unavailable methods {unknown}; available: {sorted(methods)}")
    if "standard" not in names:
        names.insert(0, "standard")
    measure = cuda_step_peak if x.is_cuda else cpu_step_peak
    cond = conditions(a.device)
    cond.update(model=a.model, batch=a.batch, dtype=a.dtype, channels_last=a.channels_last, policies=a.policies,
                how="torch.cuda.max_memory_allocated" if x.is_cuda else "torch.profiler profile_memory")
    rows = {}
    with device_policies(a.policies) if a.policies else contextlib.nullcontext():
        for n in names:
            torch.manual_seed(0)
            train_step(model, opt, methods[n].loss, x, y)  # warm-up: lazily built state is resting state too
            peak, net = measure(model, opt, methods[n].loss, x, y)
            rows[n] = {"label": methods[n].label, "peak_bytes": peak, "net_bytes": net,
                       "floor_units": FLOOR_UNITS[methods[n].floor]}
            print(f"  {methods[n].label:45s} peak {peak / MIB:9.1f} MiB (net {net / MIB:+.1f})", flush=True)
    # after the steps, so that the optimizer's momentum exists (it is resting state for every method)
    resting = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers(), x, y])
    resting += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))
    std = rows["standard"]["peak_bytes"]
    for r in rows.values():
        r["x_standard"] = r["peak_bytes"] / std
    lines = [f"### Peak memory of a training step — {a.model}, batch {a.batch}, {a.dtype}"
             f"{', channels-last' if a.channels_last else ''}, {cond['device']}", "",
             f"torch {cond['torch']}, commit {cond['commit']}, {cond['date']}. Peak tensor memory above the resting "
             f"state ({resting / MIB:.1f} MiB: weights, buffers, optimizer state, batch), measured with "
             f"{cond['how']}; one step per method after an untimed one"
             f"{f', the fused backend with the {a.policies.upper()} settings' if a.policies else ''}. "
             f"Target (issue #3): ≤ 2× the standard step.", "",
             "| method | peak MiB | × standard | ≤ 2× |", "|---|---:|---:|:---:|"]
    for r in rows.values():
        lines.append(f"| {r['label']} | {r['peak_bytes'] / MIB:.1f} | {r['x_standard']:.2f} | "
                     f"{'yes' if r['x_standard'] <= 2 else '**no**'} |")
    name = (f"memory_{torch.device(a.device).type}_{a.model}_b{a.batch}_{a.dtype}{'_cl' if a.channels_last else ''}"
            f"{f'_{a.policies}_policies' if a.policies else ''}")
    publish(lines, a.out, name, {"conditions": cond, "resting_bytes": resting, "rows": rows})
    if a.out:
        print("wrote " + bar_chart(os.path.join(a.out, name + ".png"), a, rows, cond))


def bar_chart(path, a, rows, cond):
    """The table as a picture: each method's peak as a multiple of the standard step, the 2x target."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(rows)
    fig = Figure(figsize=(10, 0.42 * len(names) + 1.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    ys = list(range(len(names)))[::-1]
    vals = [rows[n]["x_standard"] for n in names]
    ax.barh(ys, vals, color=["#4c72b0" if v <= 2 else "#c44e52" for v in vals])
    ax.axvline(2.0, color="black", linestyle="--", linewidth=1, label="target: 2x the standard step")
    for yv, n in zip(ys, names):
        ax.text(rows[n]["x_standard"], yv, f" {rows[n]['x_standard']:.2f}x ({rows[n]['peak_bytes'] / MIB:.0f} MiB)",
                va="center", fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels([rows[n]["label"] for n in names], fontsize=8)
    ax.set_xlabel("peak memory of one step above the resting state, x the standard step", fontsize=9)
    ax.set_xlim(0, max(vals + [2.0]) * 1.35)
    ax.set_title(f"{a.model}, batch {a.batch}, {a.dtype}{', channels-last' if a.channels_last else ''}, "
                 f"{cond['device']}\ntorch {cond['torch']}, commit {cond['commit']}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    return path


if __name__ == "__main__":
    main()
