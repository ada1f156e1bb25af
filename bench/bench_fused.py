"""backend="fused" vs backend="reference": seconds per training step, interleaved, with the FLOP floor.

    python bench/bench_fused.py --out bench/results                 # CPU, ResNet-20, batch 128, fp32
    python bench/bench_fused.py --device cuda --dtype bfloat16 --out bench/results

Every round times each method once (median of --repeats steps after a warm-up), in the same order,
so a noisy machine (other jobs on a 2-core box) slows all of them alike; the table reports the
median over rounds, each step as a multiple of the standard step and of its FLOP floor (SPEC.md
"Cost model", bench/steps.py FLOOR_UNITS), and the fused/reference speedup of each pair — the
median of the per-round ratios, a steadier statistic than the ratio of medians. ``--profile`` adds
the top autograd nodes of the fused J-SIGR step. Results:
``<out>/fused_<device>_<model>_b<batch>_<dtype>[_cl]_t<threads>[_<gpu kernels>][_<pairs>][_<ablations>].{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_step import format_top_ops, profile_top_ops  # noqa: E402
from steps import (FLOOR_UNITS, add_step_arguments, apply_step_arguments, conditions, make_methods,  # noqa: E402
                   make_setup, publish, time_steps)

import jsigr_fast  # noqa: E402

PAIRS = (("double_backprop", "double_backprop_fused"), ("jsigr", "jsigr_fused"),
         ("jsigr_hutchinson", "jsigr_hutchinson_fused"), ("jsigr_fd", "jsigr_fd_fused"))
# --ablation NAME: (the ablation's method, the method it is timed against, what it changes); bench/steps.py
ABLATIONS = {
    "eager": ("jsigr_eager_fused", "jsigr_fused", "the input-gradient penalty's parameter gradients taken "
              "inside the loss call (one create_graph VJP graph alive at a time)"),
    "bn_rebuild": ("jsigr_bn_rebuild_fused", "jsigr_bn_keep_fused", "batch_norm_backward's double backward "
                   "rebuilding grad_y from its own output instead of keeping it (ops.BN_REBUILD_GRAD_Y on vs off)"),
    "rebuild_torch": ("jsigr_bn_rebuild_torch_fused", "jsigr_bn_rebuild_fused", "the rebuilt grad_y formed with "
                      "torch ops and passed to the double backward given grad_y, instead of the double backward "
                      "straight from grad_x (ops.BN_DOUBLE_BACKWARD_FROM_GRAD_X off; the rebuild on in both)"),
    "aten_rules": ("jsigr_aten_rules_fused", "jsigr_fused", "ATen's conv and ReLU autograd in the create-graph "
                   "passes instead of the fused double-backward rules (fused.LAYER_RULES empty; batch norm stays "
                   "fused)"),
    "python_rules": ("jsigr_python_rules_fused", "jsigr_fused", "the conv / ReLU double-backward rules as Python "
                     "autograd Functions instead of the C++ ones (fused.CPP_RULES off)"),
    "aten_bn": ("jsigr_aten_bn_fused", "jsigr_fused", "ATen's batch-norm forward and backward kernels inside the "
                "fused batch-norm ops, the fused double backward kept (ops.ATEN_BN_KERNELS on)"),
    "recompute": ("jsigr_recompute_input_fused", "jsigr_keep_input_fused", "the conv after relu(batch_norm(h)) "
                  "recomputing its input from h in its weight gradient instead of keeping it, the ReLU keeping a "
                  "one-byte mask (fused.RECOMPUTE_CONV_INPUT on vs off)"),
    "fd_kept": ("jsigr_fd_kept", "jsigr_fd", "every perturbed forward's graph kept to the backward "
                "(finite_difference.FREE_EARLY off)"),
    "fd_rules": ("jsigr_fd_rules", "jsigr_fd_fused", "the fused conv / ReLU double-backward rules and the fused "
                 "batch norm on every layout in fd's first-order passes, instead of ATen's conv / ReLU and ATen's "
                 "batch norm where fused.FIRST_ORDER_ATEN_BN says (fused.FIRST_ORDER_NATIVE off)"),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(p)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--pairs", default=",".join(r for r, _ in PAIRS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--layout-ablation", action="store_true",
                   help="add the standard and reference steps on a channels-last input and the fused J-SIGR "
                        "step with NCHW activations (fused.CHANNELS_LAST off)")
    p.add_argument("--ablation", action="append", choices=sorted(ABLATIONS), default=[],
                   help="add an ablation step and its time as a multiple of the step it changes (repeatable): "
                        + "; ".join(f"{k}: {m} vs {base}, {what}" for k, (m, base, what) in ABLATIONS.items()))
    p.add_argument("--gpu-kernels", default=None, choices=["cuda", "triton"],
                   help="the GPU implementation of the batch-norm and mask ops (jsigr_fast.ops.use_gpu_kernels); "
                        "default: as selected at import")
    a = p.parse_args(argv)
    if a.gpu_kernels:
        jsigr_fast.ops.use_gpu_kernels(a.gpu_kernels)
    dtype = apply_step_arguments(a)
    model, opt, x, y = make_setup(a.model, a.batch, device=a.device, dtype=dtype, channels_last=a.channels_last)
    methods = make_methods(model.input_shape, backend="reference")
    wanted = [q for q in PAIRS if q[0] in a.pairs.split(",")]
    missing = [f for _, f in wanted if f not in methods]
    if missing:
        p.error(f"the fused backend is not available here ({missing}); build the extension first")
    names = ["standard"] + [n for pair in wanted for n in pair]
    if a.layout_ablation:
        names += ["standard_cl", "jsigr_cl", "jsigr_fused_nchw"]
    paired = {n for pair in PAIRS for n in pair}
    for abl in a.ablation:
        method, base, _ = ABLATIONS[abl]
        if base not in names and base in paired:
            p.error(f"--ablation {abl} is timed against {base}: include the pair that has it")
        if base not in names:  # a base of its own (bn_rebuild's: both settings forced)
            names.append(base)
        names.append(method)
    cond = conditions(a.device)
    cond.update({"model": a.model, "batch": a.batch, "dtype": a.dtype, "channels_last": a.channels_last,
                 "threads": torch.get_num_threads(), "rounds": a.rounds, "repeats": a.repeats})
    try:
        cond["cpu_kernels"] = torch.ops.jsigr_fast.batch_norm_cpu_isa()
    except (AttributeError, RuntimeError):
        cond["cpu_kernels"] = None
    cond["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    print("conditions:", json.dumps(cond))

    times = {n: [] for n in names}
    peaks = {n: [] for n in names}  # CUDA only: torch.cuda.max_memory_allocated per timed call (GiB)
    for r in range(a.rounds):
        for n in names:
            torch.manual_seed(0)
            t = time_steps(model, opt, methods[n].loss, x, y, warmup=1, repeats=a.repeats, device=a.device)
            times[n].append(t["median_s"])
            if t.get("peak_mem_gib") is not None:
                peaks[n].append(t["peak_mem_gib"])
            print(f"  round {r}: {methods[n].label:40s} {t['median_s'] * 1e3:8.1f} ms", flush=True)

    med = lambda v: float(torch.tensor(v, dtype=torch.float64).median())  # noqa: E731
    std = med(times["standard"])
    rows = {}
    for n in names:
        m = med(times[n])
        units = FLOOR_UNITS[methods[n].floor]
        rows[n] = {"label": methods[n].label, "median_s": m, "min_s": min(times[n]), "rounds_s": times[n],
                   "floor_units": units, "x_standard": m / std, "x_floor": m / (std * units / 3)}
        if peaks[n]:
            rows[n]["peak_mem_gib"] = max(peaks[n])
    mem = bool(peaks["standard"])
    if mem:  # the memory target: peak <= 2x the standard step's
        for n in names:
            if "peak_mem_gib" in rows[n]:
                rows[n]["peak_mem_x_standard"] = rows[n]["peak_mem_gib"] / rows["standard"]["peak_mem_gib"]
    ablation = [("jsigr", "jsigr_fused_nchw"), ("jsigr_cl", "jsigr_fused")] if a.layout_ablation else []
    for ref, fus in ablation:
        rows[f"{fus}_vs_{ref}"] = {"speedup_rounds": [a_ / b_ for a_, b_ in zip(times[ref], times[fus])]}
    for abl in a.ablation:
        method, base, _ = ABLATIONS[abl]
        rows[method][f"x_{base}_rounds"] = [e / f for e, f in zip(times[method], times[base])]
    for ref, fus in wanted:
        ratios = [a_ / b_ for a_, b_ in zip(times[ref], times[fus])]
        rows[fus]["speedup_vs_reference"] = med(ratios)
        rows[fus]["speedup_rounds"] = ratios
    if a.profile:
        rows["jsigr_fused"]["top_ops"] = profile_top_ops(model, opt, methods["jsigr_fused"].loss, x, y)

    lines = [f"### backend=fused vs reference — {a.model}, batch {a.batch}, {a.dtype}"
             f"{', channels_last' if a.channels_last else ''}, {cond['device']}", "",
             f"torch {cond['torch']}, threads {cond['threads']}, CPU kernels {cond['cpu_kernels']}, commit "
             f"{cond['commit']}, {cond['date']}; median over {a.rounds} interleaved rounds (each the median of "
             f"{a.repeats} steps after a warm-up). Speedup = median of the per-round reference/fused ratios. "
             f"Load average (other jobs on this machine) at start {cond['loadavg_start']}, at end "
             f"{[round(v, 2) for v in os.getloadavg()]}.", "",
             "| method | ms/step (median) | ms/step (best round) | × standard | floor (units) | × floor "
             "| speedup vs reference (median [min–max] of rounds) |" + (" peak GiB (× standard) |" if mem else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if mem else "")]
    for n in names:
        r = rows[n]
        sp = ""
        if n == "jsigr_fused_nchw":
            q = rows["jsigr_fused_nchw_vs_jsigr"]["speedup_rounds"]
            sp = f"{med(q):.2f}x [{min(q):.2f}–{max(q):.2f}]"
        if "speedup_vs_reference" in r:
            q = r["speedup_rounds"]
            sp = f"**{r['speedup_vs_reference']:.2f}x** [{min(q):.2f}–{max(q):.2f}]"
        pm = ""
        if mem:
            pm = (f" {r['peak_mem_gib']:.2f} ({r['peak_mem_x_standard']:.2f}×) |" if "peak_mem_gib" in r else " – |")
        lines.append(f"| {r['label']} | {r['median_s'] * 1e3:.0f} | {r['min_s'] * 1e3:.0f} | {r['x_standard']:.2f} | "
                     f"{r['floor_units']} | {r['x_floor']:.2f} | {sp} |{pm}")
    if a.layout_ablation:
        q = rows["jsigr_fused_vs_jsigr_cl"]["speedup_rounds"]
        lines += ["", f"Layout ablation: the fused step's activations are channels-last on this device "
                      f"(fused.CHANNELS_LAST) whatever the input's layout; against the reference on a channels-last "
                      f"input the fused step is {med(q):.2f}x [{min(q):.2f}–{max(q):.2f}] faster, and with its "
                      f"activations kept NCHW it is the 'NCHW activations' row's speedup."]
    for abl in a.ablation:
        method, base, what = ABLATIONS[abl]
        q = rows[method][f"x_{base}_rounds"]
        lines += ["", f"Ablation '{abl}' ({what}): {med(q):.2f}x [{min(q):.2f}–{max(q):.2f}] the time of "
                      f"'{methods[base].label}' (median [min–max] of rounds); peak memory: bench/bench_memory.py."]
    if "top_ops" in rows.get("jsigr_fused", {}):
        lines += format_top_ops(rows["jsigr_fused"]["top_ops"], "the fused J-SIGR step",
                                rows["jsigr_fused"]["median_s"] * 1e3)
    name = (f"fused_{torch.device(a.device).type}_{a.model}_b{a.batch}_{a.dtype}"
            f"{'_cl' if a.channels_last else ''}_t{torch.get_num_threads()}"
            f"{'_' + a.gpu_kernels if a.gpu_kernels else ''}"
            f"{'' if len(wanted) == len(PAIRS) else '_' + '_'.join(r for r, _ in wanted)}"
            f"{''.join('_' + abl for abl in a.ablation)}")
    publish(lines, a.out, name, {"conditions": cond, "results": rows})
    return rows


if __name__ == "__main__":
    main()
