"""pytest-benchmark: a standard CE training step vs the reference J-SIGR step, side by side.

    .venv/bin/python -m pytest bench/test_bench_step.py --benchmark-only \
        --benchmark-json=bench/results/pytest_step_cpu_resnet20_b32.json

Same model, batch, dtype and device for every method (bench/steps.py); the group name carries the
configuration and ``extra_info`` the conditions (device, versions, threads, FLOP-floor units).
Runs on CUDA too when ``JSIGR_BENCH_DEVICE=cuda`` is set.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from steps import FLOOR_UNITS, conditions, make_methods, make_setup, sync, train_step  # noqa: E402

DEVICE = os.environ.get("JSIGR_BENCH_DEVICE", "cpu")
MODEL = os.environ.get("JSIGR_BENCH_MODEL", "resnet20")
BATCH = int(os.environ.get("JSIGR_BENCH_BATCH", "32"))


@pytest.mark.parametrize("method", ["standard", "double_backprop", "jsigr", "jsigr_fused", "jsigr_fd", "jsigr_fd_fused"])
def test_training_step(benchmark, method):
    model, opt, x, y = make_setup(MODEL, BATCH, device=DEVICE)
    methods = make_methods(model.input_shape, backend="reference", device=DEVICE)
    if method not in methods:
        pytest.skip(f"{method} is not available here (the fused backend needs the compiled extension)")
    m = methods[method]
    benchmark.group = f"step {MODEL} b{BATCH} {DEVICE}"
    benchmark.extra_info.update(conditions(DEVICE))
    benchmark.extra_info.update(method=m.label, floor_units=FLOOR_UNITS[m.floor], model=MODEL, batch=BATCH,
                                dtype="float32")

    def step():
        train_step(model, opt, m.loss, x, y)
        sync(DEVICE)

    torch.manual_seed(0)
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
