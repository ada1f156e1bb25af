"""pytest-benchmark: an epoch slice (a few loader batches) of every defence, side by side (JARN Table 4 style).

    .venv/bin/python -m pytest bench/test_bench_epoch.py --benchmark-only \
        --benchmark-json=bench/results/pytest_epoch_cpu_resnet20_synthetic_b32.json

Each test times ``JSIGR_BENCH_BATCHES`` (default 2) training batches, loading included, of one
method: standard, FGSM-AT1, PGD-AT7, JARN only, JARN-AT1, J-SIGR (reference), plus J-SIGR fused /
fd when available. Same model (ResNet-20 by default), data (synthetic 32x32), loader, precision and
batch for all (bench/bench_epoch.py's set-up). Seconds per epoch = the time x ``batches_per_epoch``
/ ``batches`` (in ``extra_info``, with the FLOP-floor units and the conditions). Environment:
``JSIGR_BENCH_DEVICE`` (cpu), ``JSIGR_BENCH_MODEL`` (resnet20), ``JSIGR_BENCH_DATASET`` (synthetic),
``JSIGR_BENCH_BATCH`` (32), ``JSIGR_BENCH_BATCHES`` (2), ``JSIGR_BENCH_PRECISION`` (fp32).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_epoch  # noqa: E402
from steps import FLOOR_UNITS, conditions  # noqa: E402

DEVICE = os.environ.get("JSIGR_BENCH_DEVICE", "cpu")
MODEL = os.environ.get("JSIGR_BENCH_MODEL", "resnet20")
DATASET = os.environ.get("JSIGR_BENCH_DATASET", "synthetic")
BATCH = int(os.environ.get("JSIGR_BENCH_BATCH", "32"))
BATCHES = int(os.environ.get("JSIGR_BENCH_BATCHES", "2"))
PRECISION = os.environ.get("JSIGR_BENCH_PRECISION", "fp32")

_, ARGS = bench_epoch.parse_args(["--model", MODEL, "--dataset", DATASET, "--batch", str(BATCH), "--device", DEVICE,
                                  "--precision", PRECISION, "--batches", str(BATCHES)])


@pytest.fixture(scope="module")
def setup():
    ds, shape, classes = bench_epoch.build_data(ARGS)
    return ds, shape, bench_epoch.build_model(ARGS, shape, classes)


def _method_names():
    return bench_epoch.default_method_names((3, 32, 32), torch.device(DEVICE))  # the shape does not change the names


@pytest.mark.parametrize("method", _method_names())
def test_epoch_slice(benchmark, setup, method):
    ds, shape, model0 = setup
    run = bench_epoch.make_run(ARGS, method, model0, ds, shape, torch.device(DEVICE))
    per_epoch = len(ds) // BATCH
    benchmark.group = f"epoch slice {MODEL} {DATASET} b{BATCH} x{BATCHES} {PRECISION} {DEVICE}"
    benchmark.extra_info.update(conditions(DEVICE))
    benchmark.extra_info.update(method=run["method"].label, floor_units=FLOOR_UNITS[run["method"].floor],
                                model=MODEL, dataset=DATASET, batch=BATCH, batches=BATCHES, precision=PRECISION,
                                batches_per_epoch=per_epoch,
                                note=f"s/epoch = time x {per_epoch} / {BATCHES} (extrapolated)")

    def slice_():
        for _ in range(BATCHES):
            bench_epoch.train_batch(run, record=False)

    torch.manual_seed(0)
    benchmark.pedantic(slice_, rounds=3, warmup_rounds=1, iterations=1)
