"""Seconds per training epoch, JARN Table 4 style: the defences side by side in one run.

    python bench/bench_epoch.py                         # CPU: ResNet-20 on synthetic 32x32, batch 128
    python bench/bench_epoch.py --preset cifar-gpu      # ResNet-20, batch 128, CUDA (--dataset cifar10 --data-root D)
    python bench/bench_epoch.py --preset imagenet-gpu   # ResNet-18, 224 px, batch 256, bf16 autocast, channels_last
    python bench/bench_epoch.py --model digits_cnn --dataset digits --batch 64 --batches 2 --rounds 1 --warmup 0

Methods (bench/steps.py): standard CE, FGSM-AT1, PGD-AT7, JARN only, JARN-AT1 and J-SIGR in the
reference backend, plus J-SIGR ``fused`` when ``jsigr_fast.available_backends(device)`` lists it and
J-SIGR ``fd`` when ``jsigr_fast.loss`` takes ``mode=``. Every method trains its own copy of the same
initial model, with the same optimizer, on the same loader (same batches, same order), precision,
batch size and device. They are timed round-robin (method order rotated every round) so that a
drifting machine hits them alike. The time of a batch includes fetching it from the loader.

Unless ``--batches 0`` (a full epoch per method), an "epoch" is extrapolated: median seconds per
timed batch x batches per real epoch (``--epoch-images`` // batch; CIFAR-10's 50,000 by default for
32x32 inputs, ImageNet's 1,281,167 for 224 px). The output says so.

Next to each measured time: its multiple of the standard step, its conv-FLOP floor (SPEC.md "Cost
model": standard 3 units, PGD-AT7 17, FGSM-AT1 5, JARN 6 + adaptor/discriminator, J-SIGR 11) and how
far above that floor it runs; the speed-up over PGD-AT7, measured, at the floors (17/units) and in
JARN's Table 4 (PGD-AT7 704 s, JARN-AT1 294 s, FGSM-AT1 267 s, JARN only 217 s on CIFAR-10), and
the two targets: JARN only at least 704/217 = 3.2x ahead of PGD-AT7, fused J-SIGR >= 1.5x.

Writes ``<out>/epoch_<device>_<model>_<dataset>_b<batch>_<precision>[_<tag>].{md,json,png}``.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from steps import FLOOR_UNITS, conditions, make_methods, sync, write_record  # noqa: E402

DEFAULT_METHODS = ("standard", "fgsm_at1", "pgd_at7", "jarn", "jarn_at1", "jsigr")
# JARN (seed 001) Table 4: seconds per CIFAR-10 epoch, WRN on their GPU.
JARN_TABLE4 = {"pgd_at7": 704.0, "jarn_at1": 294.0, "fgsm_at1": 267.0, "jarn": 217.0,
               "jarn_at1_fused": 294.0, "jarn_fused": 217.0}
# minimum speed-up over PGD-AT7
TARGETS = {"jarn": 704.0 / 217.0, "jarn_fused": 704.0 / 217.0, "jsigr_fused": 1.5}
PRESETS = {
    "cpu": dict(model="resnet20", dataset="synthetic", batch=128, device="cpu", precision="fp32",
                channels_last=False, batches=1, rounds=5, warmup=1, workers=0),
    "cifar-gpu": dict(model="resnet20", dataset="synthetic", batch=128, device="cuda", precision="fp32",
                      channels_last=False, batches=20, rounds=3, warmup=3, workers=4),
    "imagenet-gpu": dict(model="resnet18", dataset="synthetic", batch=256, device="cuda", precision="bf16",
                         channels_last=True, batches=10, rounds=3, warmup=3, workers=8, image_size=224),
}
PRECISIONS = ("fp32", "bf16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="defaults for the flags below")
    p.add_argument("--model")
    p.add_argument("--dataset", help="synthetic (default), digits, cifar10, mnist, imagenet (+ --data-root)")
    p.add_argument("--data-root")
    p.add_argument("--image-size", type=int, help="synthetic images' side (default: the model's input size)")
    p.add_argument("--batch", type=int)
    p.add_argument("--device")
    p.add_argument("--precision", choices=PRECISIONS, help="fp32, or bf16 autocast (fp32 weights)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--methods", help=f"comma-separated; default {','.join(DEFAULT_METHODS)} + fused/fd J-SIGR "
                                     "when available")
    p.add_argument("--batches", type=int, help="timed batches per method per round (0: one full epoch per method)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--warmup", type=int, help="untimed batches per method before the first round")
    p.add_argument("--workers", type=int)
    p.add_argument("--epoch-images", type=int, help="images per real epoch for the extrapolation (default: the "
                                                    "dataset's; synthetic: 50,000 at 32 px, 1,281,167 at >= 128 px)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="per-batch statistic behind s/epoch and the ratios; 'min' on a shared, intermittently busy "
                        "machine (the least-disturbed batch)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--tag", default="", help="suffix for the record's file names")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--cuda-graph", action="store_true",
                   help="each method's step captured as a CUDA graph (jsigr_fast.graphed_step); a method that "
                        "cannot be captured runs eagerly and says so in its row")
    a = p.parse_args(argv)
    for k, v in PRESETS[a.preset].items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    if a.image_size is None:
        a.image_size = PRESETS[a.preset].get("image_size")
    if a.batch < 1 or a.rounds < 1 or a.batches < 0 or a.warmup < 0:
        p.error("need --batch >= 1, --rounds >= 1, --batches >= 0, --warmup >= 0")
    return p, a


def build_data(a):
    """The training set, the input shape and the number of classes. Synthetic images take the
    model's own input size (``--image-size`` to change it) and class count."""
    from jsigr_fast.data import build_dataset, dataset_info
    from jsigr_fast.models import get_model

    if a.dataset == "synthetic":
        probe = get_model(a.model)
        c, side = probe.input_shape[0], a.image_size or probe.input_shape[1]
        shape = (c, side, side)
        with torch.no_grad():
            classes = int(probe.eval()(torch.zeros(1, *shape)).shape[1])
        n = a.epoch_images or (1_281_167 if side >= 128 else 50_000)
        return build_dataset("synthetic", train=True, num_samples=n, shape=shape, num_classes=classes), shape, classes
    ds = build_dataset(a.dataset, a.data_root, train=True)
    shape, classes = dataset_info(a.dataset, a.data_root)
    return ds, tuple(shape), classes


def build_model(a, shape, classes):
    from jsigr_fast.models import DATASET_STATS, get_model

    kw = {"dataset": a.dataset} if a.dataset in DATASET_STATS else {"num_classes": classes, "in_channels": shape[0]}
    if a.model in ("digits_cnn", "mnist_cnn"):
        kw["input_size"] = shape[1]
    torch.manual_seed(0)
    return get_model(a.model, **kw)


def _batches(loader, state):
    """Endless stream of batches from ``loader``, epoch after epoch (``state['epoch']``)."""
    while True:
        loader.set_epoch(state["epoch"])
        for batch in loader:
            yield batch
        state["epoch"] += 1


def all_methods(shape, device, default_rng: bool = False) -> dict:
    """Fresh method closures (each keeps its own state: JARN's adaptor, PGD's generator; with
    ``default_rng``, for --cuda-graph, the attacks draw from the global generator)."""
    return make_methods(shape, device=device, default_rng=default_rng)


def default_method_names(shape, device) -> list[str]:
    available = all_methods(shape, device)
    extra = ("jarn_fused", "jarn_at1_fused", "jsigr_fused", "jsigr_fd", "jsigr_fd_fused")
    return list(DEFAULT_METHODS) + [n for n in extra if n in available]


def make_run(a, name, model0, ds, shape, device):
    """One method's independent training state: a copy of ``model0``, SGD, the loader's batch stream."""
    from jsigr_fast.data import make_loader

    memory_format = torch.channels_last if a.channels_last else torch.contiguous_format
    model = copy.deepcopy(model0).to(device=device, memory_format=memory_format).train()
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, weight_decay=5e-4)
    loader = make_loader(ds, a.batch, train=True, workers=a.workers, seed=0)
    graphs = bool(getattr(a, "cuda_graph", False))
    return dict(model=model, opt=opt, stream=_batches(loader, {"epoch": 0}),
                method=all_methods(shape, device, default_rng=graphs)[name],
                times=[], device=device, memory_format=memory_format, precision=a.precision,
                amp=torch.autocast(device.type, dtype=torch.bfloat16) if a.precision == "bf16" else None,
                cuda_graph=graphs, graph=None, graph_error=None)


# the graph class GraphedStep captures with (None: torch.cuda.CUDAGraph); tests set a CPU stand-in
GRAPH_FACTORY = None


def _graph_loss(r):
    """The method's loss as the graph runs it: under bf16 autocast without its weight cache (a capture
    would keep the cast weights of the capture's step)."""
    loss = r["method"].loss
    if r["precision"] != "bf16":
        return loss

    def under_autocast(model, x, y):
        with torch.autocast(r["device"].type, dtype=torch.bfloat16, cache_enabled=False):
            return loss(model, x, y)
    return under_autocast


def _graphed_batch(r, x, y, t0, record):
    """train_batch through the method's CUDA graph (captured at its first batch, untimed then); None when
    the method cannot be captured (it then runs eagerly: graph_error says why)."""
    from jsigr_fast.cuda_graphs import CaptureError, GraphedStep

    if r["graph"] is None:
        try:
            r["graph"] = GraphedStep(r["model"], r["opt"], _graph_loss(r), x, y, _graph_factory=GRAPH_FACTORY)
        except CaptureError as e:
            r["graph_error"] = e.reason
            print(f"  {r['method'].label}: {r['graph_error']}; runs eagerly", flush=True)
            return None
        record = False  # the capture's warm-up steps are in this batch's time
    loss = r["graph"](x, y)
    sync(r["device"])
    if record:
        r["times"].append(time.perf_counter() - t0)
    return float(loss)


def train_batch(r, record: bool = True) -> float:
    """Fetch the next batch and take one training step; append its wall time (loading included) to
    ``r["times"]`` when ``record``. Returns the loss."""
    t0 = time.perf_counter()
    x, y = next(r["stream"])
    x = x.to(r["device"], non_blocking=True).contiguous(memory_format=r["memory_format"])
    y = y.to(r["device"], non_blocking=True)
    if r["cuda_graph"] and r["graph_error"] is None:
        out = _graphed_batch(r, x, y, t0, record)
        if out is not None:
            return out
        record = False  # this batch's time includes the failed capture's warm-up steps
    r["opt"].zero_grad(set_to_none=True)
    if r["amp"] is not None:
        with r["amp"]:
            loss = r["method"].loss(r["model"], x, y)
    else:
        loss = r["method"].loss(r["model"], x, y)
    loss.backward()
    r["opt"].step()
    sync(r["device"])
    if record:
        r["times"].append(time.perf_counter() - t0)
    return float(loss.detach())


def run_bench(a, methods_wanted):
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    ds, shape, classes = build_data(a)
    model0 = build_model(a, shape, classes)

    available = all_methods(shape, device)
    names = list(methods_wanted) if methods_wanted else default_method_names(shape, device)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown or unavailable methods {unknown}; available: {sorted(available)}")
    if "standard" not in names:
        names.insert(0, "standard")

    per_epoch = (a.epoch_images or len(ds)) // a.batch  # drop_last=True for training
    if per_epoch < 1:
        raise ValueError(f"the dataset has {len(ds)} images, fewer than one batch of {a.batch}")
    timed = per_epoch if a.batches == 0 else a.batches
    runs = {name: make_run(a, name, model0, ds, shape, device) for name in names}

    for name in names:
        for _ in range(a.warmup):
            train_batch(runs[name], False)
    for rnd in range(a.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            for _ in range(timed):
                runs[name]["last_loss"] = train_batch(runs[name])
            print(f"  round {rnd + 1}/{a.rounds} {runs[name]['method'].label:44s} "
                  f"{sum(runs[name]['times'][-timed:]) / timed:8.3f} s/batch", flush=True)

    results = {}
    for name in names:
        t = torch.tensor(runs[name]["times"], dtype=torch.float64)
        m = runs[name]["method"]
        med = float(t.quantile(0.5)) if a.stat == "median" else float(t.min())
        results[name] = {"label": m.label, "floor_units": FLOOR_UNITS[m.floor], "n_timed": len(runs[name]["times"]),
                         "s_per_batch": med, "stat": a.stat, "median_s_per_batch": float(t.quantile(0.5)),
                         "min_s_per_batch": float(t.min()), "p20_s": float(t.quantile(0.2)),
                         "p80_s": float(t.quantile(0.8)), "mean_s_per_batch": float(t.mean()), "s_per_epoch": med * per_epoch,
                         "images_per_s": a.batch / med, "final_loss": runs[name].get("last_loss")}
        if runs[name]["cuda_graph"]:
            results[name]["cuda_graph"] = runs[name]["graph_error"] is None
            if runs[name]["graph_error"]:
                results[name]["graph_error"] = runs[name]["graph_error"]
                results[name]["label"] += " (eager: not capturable)"
    std = results["standard"]["s_per_batch"]
    pgd = results.get("pgd_at7", {}).get("s_per_batch")
    for name, r in results.items():
        r["x_standard"] = r["s_per_batch"] / std
        r["x_floor"] = r["x_standard"] / (r["floor_units"] / 3)
        if pgd is not None:
            r["pgd_at7_speedup"] = pgd / r["s_per_batch"]
            r["pgd_at7_speedup_floor"] = FLOOR_UNITS["pgd_at7"] / r["floor_units"]
            if name in JARN_TABLE4:
                r["pgd_at7_speedup_jarn_paper"] = JARN_TABLE4["pgd_at7"] / JARN_TABLE4[name]
    targets = {}
    for name, need in TARGETS.items():
        if pgd is not None and name in results:
            got = results[name]["pgd_at7_speedup"]
            targets[name] = {"need": need, "measured": got, "met": bool(got >= need),
                             "floor": FLOOR_UNITS["pgd_at7"] / results[name]["floor_units"]}
    info = {"per_epoch_batches": per_epoch, "epoch_images": per_epoch * a.batch, "timed_batches_per_round": timed,
            "input_shape": list(shape), "num_classes": classes}
    return results, targets, info


def _fmt_s(s: float) -> str:
    return f"{s:.3f}" if s < 10 else f"{s:.1f}" if s < 1000 else f"{s:,.0f}"


def format_markdown(a, cond, results, targets, info) -> str:
    extrap = a.batches != 0
    lines = [
        f"### Seconds per training epoch (JARN Table 4 style) — {a.model}, {a.dataset} "
        f"{'x'.join(map(str, info['input_shape']))}, batch {a.batch}, {a.precision}"
        f"{', channels_last' if a.channels_last else ''}, {cond['device']}", "",
        f"torch {cond['torch']}, triton {cond['triton']}, threads {cond['threads']}, commit {cond['commit']}, "
        f"{cond['date']}. Each method: its own copy of the same initial model, SGD, the same loader and batches; "
        f"{a.warmup} warm-up batch(es), then {a.rounds} round(s) x {info['timed_batches_per_round']} timed batch(es), "
        "round-robin; a batch's time includes loading it"
        + ("; **each step replays a CUDA graph** (jsigr_fast.graphed_step: the batch checked, copied in, one "
           "launch; captured at the method's first batch, untimed)" if a.cuda_graph else "")
        + ". Load average (1 min) before / after: "
        f"{cond['loadavg_before'][0]:.1f} / {cond['loadavg_after'][0]:.1f}"
        + (f" — **the machine was busy** (more runnable threads than the {cond['threads']} used here): "
           "read the p20 column too" if max(cond['loadavg_before'][0], cond['loadavg_after'][0]) > cond['threads'] + 0.75
           else "") + ".", "",
        (f"**s/epoch is extrapolated**: {a.stat} s/batch x {info['per_epoch_batches']} batches per epoch "
         f"({info['epoch_images']:,} images / batch {a.batch}), not a full timed epoch."
         if extrap else f"s/epoch: {a.stat} s/batch x {info['per_epoch_batches']} batches of one full epoch per method.")
        + f" Ratios use the {a.stat} s/batch too.",
        "",
        f"| method | s/batch, {a.stat} [p20–p80] | s/epoch | img/s | × standard | floor (units) | × floor "
        "| PGD-AT7 ÷ method | at floors | JARN Table 4 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        sp = f"{r['pgd_at7_speedup']:.2f}" if "pgd_at7_speedup" in r else "–"
        fl = f"{r['pgd_at7_speedup_floor']:.2f}" if "pgd_at7_speedup_floor" in r else "–"
        jp = f"{r['pgd_at7_speedup_jarn_paper']:.2f}" if "pgd_at7_speedup_jarn_paper" in r else "–"
        lines.append(f"| {r['label']} | {_fmt_s(r['s_per_batch'])} [{_fmt_s(r['p20_s'])}–{_fmt_s(r['p80_s'])}] "
                     f"| {_fmt_s(r['s_per_epoch'])} | {r['images_per_s']:.0f} | {r['x_standard']:.2f} "
                     f"| {r['floor_units']} | {r['x_floor']:.2f} | {sp} | {fl} | {jp} |")
    lines += ["", "× floor = (time / standard time) / (units / 3): 1.00 runs exactly at its conv-FLOP floor. "
              "PGD-AT7 ÷ method: the speed-up over PGD-AT7 (JARN Table 4: 704/294 = 2.39 JARN-AT1, 704/267 = 2.64 "
              "FGSM-AT1, 704/217 = 3.24 JARN only). FGSM-AT1 and JARN-AT1 take the training CLI's FGSM example "
              "(random start, the whole batch: 2 units); JARN's adaptor and discriminator are not in its 6 units.", ""]
    for name, t in targets.items():
        what = {"jarn": "JARN only (reference) ≥ 704/217 = 3.24× faster than PGD-AT7",
                "jarn_fused": "JARN only (fused) ≥ 704/217 = 3.24× faster than PGD-AT7",
                "jsigr_fused": "fused J-SIGR ≥ 1.5× faster than PGD-AT7"}[name]
        lines.append(f"- target {what}: measured {t['measured']:.2f}× — **{'met' if t['met'] else 'not met'}** "
                     f"(at the FLOP floors it would be {t['floor']:.2f}×)")
    if "jsigr_fused" not in results:
        lines.append("- fused J-SIGR: not measured (backend not available here)")
    return "\n".join(lines)


def bar_chart(path, a, results, info):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(results)
    fig = Figure(figsize=(8, 0.45 * len(names) + 1.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    std = results["standard"]["s_per_epoch"]
    vals = [results[n]["s_per_epoch"] for n in names]
    floors = [std * results[n]["floor_units"] / 3 for n in names]
    ys = list(range(len(names)))[::-1]
    ax.barh(ys, vals, color="#4c72b0", label="measured")
    ax.scatter(floors, ys, marker="|", s=400, color="black", label="conv-FLOP floor (standard × units/3)", zorder=3)
    for yv, v, f, n in zip(ys, vals, floors, names):
        ax.text(max(v, f), yv, f" {v:.3g} s ({results[n]['x_floor']:.2f}× floor)", va="center", fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels([results[n]["label"] for n in names], fontsize=8)
    ax.set_xlabel(f"seconds per epoch ({a.stat} batch" + (" x batches per epoch, extrapolated)" if a.batches != 0 else ")"))
    ax.set_xlim(0, max(vals + floors) * 1.45)
    ax.set_title(f"{a.model}, {a.dataset} {'x'.join(map(str, info['input_shape']))}, batch {a.batch}, {a.precision}, "
                 f"{a.device}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    return path


def main(argv=None):
    p, a = parse_args(argv)
    wanted = [m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None
    if torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available (use --preset cpu)")
    if a.cuda_graph and torch.device(a.device).type != "cuda" and GRAPH_FACTORY is None:
        p.error("--cuda-graph needs --device cuda")
    load_before = os.getloadavg()
    try:
        results, targets, info = run_bench(a, wanted)
    except ValueError as err:
        p.error(str(err))
    cond = conditions(a.device)
    cond["loadavg_before"], cond["loadavg_after"] = list(load_before), list(os.getloadavg())
    cond.update({"model": a.model, "dataset": a.dataset, "batch": a.batch, "precision": a.precision,
                 "dtype": "bfloat16 autocast (fp32 weights)" if a.precision == "bf16" else "float32",
                 "channels_last": bool(a.channels_last), "workers": a.workers, "warmup": a.warmup,
                 "cuda_graph": bool(a.cuda_graph),
                 "rounds": a.rounds, "timed_batches_per_round": info["timed_batches_per_round"],
                 "steps_timed_per_method": a.rounds * info["timed_batches_per_round"],
                 "extrapolated": a.batches != 0, "statistic": a.stat, "preset": a.preset, "optimizer": f"SGD lr {a.lr} momentum 0.9",
                 **info})
    table = format_markdown(a, cond, results, targets, info)
    print()
    print(table)
    os.makedirs(a.out, exist_ok=True)
    dev = torch.device(a.device).type
    stem = os.path.join(a.out, f"epoch_{dev}_{a.model}_{a.dataset}_b{a.batch}_{a.precision}" +
                        ("_graphs" if a.cuda_graph else "") + (f"_{a.tag}" if a.tag else ""))
    record = {"conditions": cond, "results": results, "targets": targets,
              "floor_units": {n: r["floor_units"] for n, r in results.items()},
              "jarn_table4_s_per_epoch": JARN_TABLE4}
    written = write_record(stem, record, table)
    if not a.no_plot:
        written.append(bar_chart(stem + ".png", a, results, info))
    print("\nwrote " + ", ".join(written))
    return record, written


if __name__ == "__main__":
    main()
