"""``--throughput-steps N``: images per second of the configured training step, and the projected
time of one epoch on 1 and 8 GPUs.

Runs ``throughput_warmup`` untimed steps (cuDNN autotuning, allocator warm-up), then times ``N``
steps between two device synchronisations, through the real data loader (so with ``--synthetic``
it measures the step plus the loader, minus JPEG decoding; "data wait" is the host time spent
waiting for the next batch). Methods with a warm-up phase (JARN) are measured in their full phase.
The classifier's learning rate is set to 0 (the optimizer still runs, at the same cost), so the
measurement is a steady state that cannot diverge from a random start. Nothing is checkpointed or
logged: ``throughput.json`` is all it writes, so it may run in a folder that holds a run.
The projection is ``epoch_images / img_per_s``: for this run as launched,
and for 1 and 8 devices assuming each device keeps this run's per-device rate (linear scaling, an
upper bound: DDP on one NVLink node typically reaches 90-95 % of it for ResNet-18; the double
backward adds compute, not communication).
"""
from __future__ import annotations

import json
import os
import time

import torch

__all__ = ["measure", "projection"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def projection(img_per_s: float, world_size: int, epoch_images: int) -> dict:
    per_device = img_per_s / world_size
    return {"this_run_s": epoch_images / img_per_s, "one_device_s": epoch_images / per_device,
            "eight_devices_s": epoch_images / (8 * per_device)}


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def measure(trainer, stop) -> int:
    cfg, env, device = trainer.cfg, trainer.env, trainer.device
    warm, steps = cfg.throughput_warmup, cfg.throughput_steps
    trainer.model.train()
    trainer.method.train(True)
    trainer.scheduler.base_lrs = [0.0] * len(trainer.optimizer.param_groups)
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.0
    epoch = 0
    trainer.train_loader.set_epoch(epoch)
    it = iter(trainer.train_loader)

    def next_batch():
        nonlocal it, epoch
        try:
            return next(it)
        except StopIteration:
            epoch += 1
            trainer.train_loader.set_epoch(epoch)
            it = iter(trainer.train_loader)
            return next(it)

    t0 = data_wait = 0.0
    for i in range(warm + steps):
        if i == warm:
            _sync(device)
            t0, data_wait = time.perf_counter(), 0.0
        td = time.perf_counter()
        x, y, extra = trainer._to_device(next_batch())
        data_wait += time.perf_counter() - td
        _, stop_now = trainer._step(x, y, extra, stop, step=trainer.total_steps)
        if stop_now:
            trainer.print("throughput measurement interrupted")
            return stop.exit_code if stop.requested else 143
    _sync(device)
    elapsed = time.perf_counter() - t0
    img_per_s = steps * cfg.batch_size / elapsed
    epoch_images = len(trainer.spec.train)
    proj = projection(img_per_s, env.world_size, epoch_images)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    shape = "x".join(str(d) for d in trainer.spec.input_shape)
    report = {
        "method": cfg.method, "model": trainer.arch["model"], "input_shape": list(trainer.spec.input_shape),
        "global_batch": cfg.batch_size, "world_size": env.world_size, "device": name, "amp": cfg.amp,
        "channels_last": cfg.channels_last, "steps": steps, "seconds": elapsed, "img_per_s": img_per_s,
        "ms_per_step": 1000 * elapsed / steps, "data_wait_fraction": data_wait / elapsed,
        "epoch_images": epoch_images, "projection": proj, "torch": str(torch.__version__),
        "skipped_steps": trainer.counters["nonfinite_total"],
    }
    trainer.print(f"throughput: {cfg.method} / {trainer.arch['model']} on {shape}, global batch {cfg.batch_size}, "
                  f"{env.world_size} x {name}, amp {cfg.amp}{', channels_last' if cfg.channels_last else ''}")
    trainer.print(f"  {img_per_s:,.1f} img/s ({report['ms_per_step']:.1f} ms/step over {steps} steps; "
                  f"data wait {100 * report['data_wait_fraction']:.0f} % of the time)")
    trainer.print(f"  one epoch of {epoch_images:,} images: {_hms(proj['this_run_s'])} as launched; "
                  f"{_hms(proj['one_device_s'])} on 1 device, {_hms(proj['eight_devices_s'])} on 8 "
                  f"(linear scaling of the per-device rate)")
    if report["skipped_steps"]:
        trainer.print(f"  warning: {report['skipped_steps']} steps had a non-finite loss and were skipped; the rate "
                      f"above is not that of full steps")
    if env.is_main:
        with open(os.path.join(trainer.out, "throughput.json"), "w") as f:
            json.dump(report, f, indent=2)
    return 0
