"""Training steps timed by the benchmarks, and the FLOP floor each one is compared with.

Every method is one optimizer step on the same model, batch, dtype and device; they differ only in
the loss. The floor (SPEC.md "Cost model") counts conv FLOPs in units where a forward is 1 and a
standard training step is 3 (forward 1 + backward 2).
"""
from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import jsigr_fast
from jsigr_fast.models import get_model

# conv-FLOP units per step (SPEC.md): standard 3; one double-backprop term 6; input-gradient
# penalty + one Jacobian projection at the same x 9; J-SIGR adds the perturbed saliency gradient
# (forward + input-only backward, no graph) 2 -> 11; PGD-AT-k = k*(1+1) + 3; FGSM-AT ~ 5;
# JARN = one double-backprop term (6) plus the adaptor and a small discriminator (not counted).
FLOOR_UNITS = {
    "standard": 3,
    "double_backprop": 6,
    "jacobian_projection": 6,
    "jsigr": 11,
    "jsigr_hutchinson": 11,
    "jarn": 6,
    "fgsm_at": 5,
    "pgd_at7": 17,
}


@dataclass
class Method:
    name: str
    floor: str  # key of FLOOR_UNITS
    loss: Callable  # (model, x, y) -> scalar
    label: str


def make_methods(input_shape, *, backend: str = "reference") -> dict[str, Method]:
    methods = {
        "standard": Method("standard", "standard", lambda m, x, y: F.cross_entropy(m(x), y), "standard CE"),
        "double_backprop": Method("double_backprop", "double_backprop",
                                  lambda m, x, y: jsigr_fast.double_backprop(m, x, y, backend=backend),
                                  f"double backprop ({backend})"),
        "jsigr": Method("jsigr", "jsigr", lambda m, x, y: jsigr_fast.loss(m, x, y, backend=backend),
                        f"J-SIGR, projection ({backend})"),
        "jsigr_hutchinson": Method("jsigr_hutchinson", "jsigr_hutchinson",
                                   lambda m, x, y: jsigr_fast.loss(m, x, y, jacobian="hutchinson", backend=backend),
                                   f"J-SIGR, Hutchinson JVP ({backend})"),
    }
    return methods


def make_setup(model_name: str, batch: int, *, device="cpu", dtype=torch.float32, channels_last=False,
               num_classes=10, seed=0, **model_kw):
    torch.manual_seed(seed)
    model = get_model(model_name, num_classes=num_classes, **model_kw).to(device=device, dtype=dtype).train()
    shape = model.input_shape
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model = model.to(memory_format=memory_format)
    x = torch.rand(batch, *shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    y = torch.randint(0, num_classes, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return model, opt, x, y


def train_step(model, opt, loss_fn, x, y):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, x, y)
    loss.backward()
    opt.step()
    return loss


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, opt, loss_fn, x, y, *, warmup=1, repeats=5, device="cpu"):
    """Seconds per step: median and p20/p80 over ``repeats`` timed steps after ``warmup``."""
    for _ in range(warmup):
        train_step(model, opt, loss_fn, x, y)
    sync(device)
    times = []
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        t0 = time.perf_counter()
        train_step(model, opt, loss_fn, x, y)
        sync(device)
        times.append(time.perf_counter() - t0)
    t = torch.tensor(times, dtype=torch.float64)
    out = {"median_s": float(t.quantile(0.5)), "p20_s": float(t.quantile(0.2)), "p80_s": float(t.quantile(0.8)),
           "repeats": repeats}
    if torch.device(device).type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def conditions(device) -> dict:
    """What a reader needs to reproduce a number: hardware, versions, threads, commit."""
    dev = torch.device(device)
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "jsigr_fast": jsigr_fast.__version__,
        "compiled_ops": jsigr_fast.extension_loaded(),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        info["commit"] = None
    if dev.type == "cuda":
        info["device"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    else:
        cpu = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        cpu = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        info["device"] = f"{cpu} ({os.cpu_count()} cores)"
    return info
