"""Host work per training step: what a launch-bound GPU waits for, counted on the CPU.

    python bench/bench_overhead.py --policies cuda --out bench/results     # the GPU's layer choices
    python bench/bench_overhead.py --policies cpu --out bench/results

At CIFAR sizes an H200 finishes a ResNet-20 kernel faster than the host can launch the next one (the
standard step at batch 128: 7 ms for ~16 GFLOP; bench/results/gpu_session_h200_2026-11-23.md), so a
step's time there is mostly host work: Python, autograd bookkeeping and one dispatch per op. That
work does not depend on the tensors' size, so it can be measured here on tiny tensors (batch 2,
4x4 images, one thread, oneDNN off so the CPU's own convolutions stay cheap): per step,

* **ms/step**: median over interleaved rounds of the whole step at tiny shapes (host time plus a
  little CPU compute: an upper bound on the host's share, on this machine's CPU);
* **Python calls**: Python-level function calls (``sys.setprofile``; deterministic);
* **aten ops**: ops dispatched (a ``TorchDispatchMode``; an upper bound on kernel launches on a GPU);
* **autograd nodes**: backward nodes the engine ran (``torch.profiler``);
* **host syncs**: ``.item()`` / ``bool(tensor)`` reads (``aten::_local_scalar_dense``), each a
  device synchronisation on a GPU.

``--policies cuda`` copies the CUDA entries of the fused backend's per-device choices
(jsigr_fast.fused: CHANNELS_LAST, BATCH_VJPS, BATCH_PROBES, LOSS_HEAD, FIRST_ORDER_ATEN_BN, LAYER_RULES,
CPP_RULES; jsigr_fast.ops: BN_REBUILD_GRAD_Y, BN_DOUBLE_BACKWARD_FROM_GRAD_X, ATEN_BN_KERNELS) onto the CPU,
so the counts are the GPU configuration's.
Results: ``<out>/overhead_cpu_<model>_<policies>_policies[_<tag>].{md,json}``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(__file__))
from steps import conditions, make_methods, publish, train_step  # noqa: E402

from jsigr_fast import fused, ops  # noqa: E402
from jsigr_fast._settings import device_setting  # noqa: E402
from jsigr_fast.models import get_model  # noqa: E402

METHODS = ("standard", "double_backprop", "double_backprop_fused", "jsigr", "jsigr_fused", "jsigr_fd",
           "jsigr_fd_fused", "jsigr_hutchinson", "jsigr_hutchinson_fused")
# the fused backend's per-device choices (dicts keyed by device type)
POLICIES = ((fused, "CHANNELS_LAST"), (fused, "BATCH_VJPS"), (fused, "BATCH_PROBES"), (fused, "LOSS_HEAD"),
            (fused, "FIRST_ORDER_ATEN_BN"), (fused, "LAYER_RULES"), (fused, "CPP_RULES"), (ops, "BN_REBUILD_GRAD_Y"),
            (ops, "BN_DOUBLE_BACKWARD_FROM_GRAD_X"), (ops, "ATEN_BN_KERNELS"), (fused, "RECOMPUTE_CONV_INPUT"))


@contextmanager
def device_policies(device_type: str):
    """The fused backend's choices for ``device_type`` applied to the CPU (restored afterwards)."""
    with ExitStack() as stack:
        for mod, name in POLICIES:
            table = getattr(mod, name)
            stack.enter_context(device_setting(table, "cpu", table.get(device_type, table["cpu"])))
        yield


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def count_step(step) -> dict:
    """Deterministic counts of one call of ``step()``: Python calls, aten ops, host syncs, autograd nodes."""
    calls = 0

    def prof(frame, event, arg):
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(prof)
    try:
        step()
    finally:
        sys.setprofile(None)
    with _CountOps() as c:
        step()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as p:
        step()
    nodes = sum(1 for e in p.events() if e.name.startswith("autograd::engine::evaluate_function"))
    return {"python_calls": calls, "aten_ops": c.ops, "host_syncs": c.syncs, "autograd_nodes": nodes}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=4, help="image side (the model's channel count is kept)")
    p.add_argument("--policies", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--onednn", action="store_true", help="keep oneDNN's convolutions (slower at tiny sizes)")
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default="", help="appended to the record's name (e.g. the commit measured)")
    a = p.parse_args(argv)
    threads, onednn = torch.get_num_threads(), torch.backends.mkldnn.enabled
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = a.onednn
    try:
        return _run(a)
    finally:  # the caller's settings back (a test runs this in-process)
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = onednn


def _run(a) -> dict:
    torch.manual_seed(0)
    model = get_model(a.model).train()
    c = model.input_shape[0]
    x = torch.rand(a.batch, c, a.size, a.size)
    y = torch.randint(0, 10, (a.batch,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    methods = make_methods(tuple(x.shape[1:]))
    names = [n.strip() for n in a.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in methods]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {sorted(methods)}")
    rows = {}
    with device_policies(a.policies):
        # fresh labels per step, as a loader gives them (a label tensor already checked is not read again)
        steps = {n: (lambda f=methods[n].loss: train_step(model, opt, f, x, y.clone())) for n in names}
        for n in names:
            steps[n]()  # warm-up (lazy state, first-call caches)
            rows[n] = {"label": methods[n].label, **count_step(steps[n]), "round_ms": []}
        for _ in range(a.rounds):
            for n in names:
                times = []
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    steps[n]()
                    times.append(time.perf_counter() - t0)
                rows[n]["round_ms"].append(1e3 * statistics.median(times))
    for r in rows.values():
        r["ms"] = statistics.median(r["round_ms"])

    info = conditions("cpu")
    std = rows.get("standard")
    lines = [f"### Host work per training step — {a.model}, batch {a.batch}, {a.size}x{a.size} images, "
             f"the {a.policies.upper()} policies", "",
             f"torch {info['torch']}, {info['device']}, 1 thread, oneDNN {'on' if a.onednn else 'off'}, "
             f"commit {info['commit']}, {info['date']}; median over {a.rounds} interleaved rounds of the median of "
             f"{a.repeats} steps. Counts are per step and deterministic; ms/step at these sizes is mostly host "
             "time (see bench/bench_overhead.py).", "",
             "| method | ms/step | × standard | Python calls | aten ops | autograd nodes | host syncs |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for n, r in rows.items():
        rel = f"{r['ms'] / std['ms']:.2f}" if std else ""
        lines.append(f"| {r['label']} | {r['ms']:.1f} | {rel} | {r['python_calls']} | {r['aten_ops']} | "
                     f"{r['autograd_nodes']} | {r['host_syncs']} |")
    record = {"conditions": info, "model": a.model, "batch": a.batch, "size": a.size, "policies": a.policies,
              "onednn": a.onednn, "rounds": a.rounds, "repeats": a.repeats, "rows": rows}
    publish(lines, a.out, f"overhead_cpu_{a.model}_{a.policies}_policies{'_' + a.tag if a.tag else ''}", record)
    return record


if __name__ == "__main__":
    main()
