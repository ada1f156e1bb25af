"""Training steps timed by the benchmarks, and the FLOP floor each one is compared with.

Every method is one optimizer step on the same model, batch, dtype and device; they differ only in
the loss. The floor (SPEC.md "Cost model") counts conv FLOPs in units where a forward is 1 and a
standard training step is 3 (forward 1 + backward 2).
"""
from __future__ import annotations

import json
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
    # FGSM-AT1 as `jsigr-fast train --method fgsm_at` runs it by default (Wong et al.'s random start,
    # every sample adversarial): forward + input-only backward on N (2) + a standard step on N (3) = 5.
    "fgsm_at1": 5,
    # JARN-AT1 as `--method jarn_at1` runs it: JARN's loss on that FGSM example, 2 + 6 (adaptor and
    # discriminator not counted).
    "jarn_at1": 8,
    # finite-difference J-SIGR (Finlay & Oberman): 3 forwards (x, x + h d_g, x + h d_J) and their backwards
    # (3 + 6), two input-only VJPs for the directions (2) and the saliency gradient (2) = 13.
    "jsigr_fd": 13,
}

# The adversarial-training baselines at JARN's CIFAR-10 settings (seed 001 §4.3): linf eps 8/255,
# PGD-AT7 = 7 steps of 2/255 from a random start.
AT_EPS = 8 / 255
AT_ALPHA = 2 / 255


@dataclass
class Method:
    name: str
    floor: str  # key of FLOOR_UNITS
    loss: Callable  # (model, x, y) -> scalar
    label: str


def fgsm_random_start(model, x, y, eps, generator):
    """The adversarial batch of the training CLI's ``fgsm_at`` (default variant) and ``jarn_at1``: its
    own function (jsigr_fast.train.methods), at the CLI's default step ``fgsm_alpha * eps``, so the
    benchmark times what training runs."""
    from types import SimpleNamespace

    from jsigr_fast.train.config import TrainConfig
    from jsigr_fast.train.methods import _fgsm_random_start

    cfg = SimpleNamespace(attack_eps=eps, fgsm_alpha=TrainConfig().fgsm_alpha)
    return _fgsm_random_start(model, x, y, cfg, generator)


class _Lazy:
    """A JARN criterion (or generator) built on first use, for the first batch's device and dtype."""

    def __init__(self, build):
        self.build, self.obj = build, None

    def __call__(self, x):
        if self.obj is None:
            self.obj = self.build(x)
        return self.obj


def write_record(stem: str, record: dict, table: str) -> list[str]:
    """Write ``<stem>.json`` (the record) and ``<stem>.md`` (the table), each atomically (temp file
    + rename, so an interrupted benchmark never leaves half a record), creating the folder; returns
    the paths. Every benchmark script records its results through this."""
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    paths = []
    for path, text in ((stem + ".json", json.dumps(record, indent=2)), (stem + ".md", table + "\n")):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
        paths.append(path)
    return paths



def publish(lines: list[str], out: str | None, name: str, record: dict) -> str:
    """Print the table made of ``lines`` and, when ``out`` is given, record it with ``record`` as
    ``<out>/<name>.json`` and ``.md`` (:func:`write_record`); returns the table."""
    table = "\n".join(lines)
    print()
    print(table)
    if out:
        print("\nwrote " + " and ".join(write_record(os.path.join(out, name), record, table)))
    return table

def _channels_last(x):
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _fused_jsigr_with(module: str, name: str, value):
    """The fused J-SIGR loss with ``jsigr_fast.<module>.<name>[x's device] = value`` during the call (restored
    afterwards): an ablation of one per-device setting. Every setting so timed is fixed inside the call (the
    layout and layer rules as the forward records the layers, the grad_y rebuild at the create-graph VJPs,
    the batch-norm kernels at each layer's forward), so the step's backward after it runs what was chosen."""
    import importlib

    from jsigr_fast._settings import device_setting

    table = getattr(importlib.import_module(f"jsigr_fast.{module}"), name)

    def loss(m, x, y):
        with device_setting(table, x.device.type, value):
            return jsigr_fast.loss(m, x, y, backend="fused")
    return loss


# fused.CHANNELS_LAST off: activations kept NCHW (the layout ablation)
_fused_nchw_jsigr = _fused_jsigr_with("fused", "CHANNELS_LAST", False)
# fused.LAYER_RULES empty: ATen's conv and ReLU autograd in the create-graph passes, batch norm still fused
_fused_jsigr_aten_layers = _fused_jsigr_with("fused", "LAYER_RULES", ())
# ops.ATEN_BN_KERNELS on: ATen's batch-norm forward / backward inside the fused ops, the fused double backward kept
_fused_jsigr_aten_bn = _fused_jsigr_with("ops", "ATEN_BN_KERNELS", ("forward", "backward"))
# fused.CPP_RULES off: the conv / ReLU rules as the Python autograd Functions instead of the C++ ones
_fused_jsigr_python_rules = _fused_jsigr_with("fused", "CPP_RULES", False)
# fused.RECOMPUTE_CONV_INPUT off / on: a conv after relu(batch_norm(h)) keeps its input, or recomputes it from h
_fused_jsigr_keep_input = _fused_jsigr_with("fused", "RECOMPUTE_CONV_INPUT", False)
_fused_jsigr_recompute_input = _fused_jsigr_with("fused", "RECOMPUTE_CONV_INPUT", True)


def _fused_jsigr_rebuild_recompute(m, x, y):
    """ops.BN_REBUILD_GRAD_Y and fused.RECOMPUTE_CONV_INPUT both forced on: the two memory settings together."""
    from jsigr_fast import fused
    from jsigr_fast._settings import device_setting

    with device_setting(fused.RECOMPUTE_CONV_INPUT, x.device.type, True):
        return _fused_jsigr_bn_rebuild(True)(m, x, y)


def _fused_jsigr_rebuild_torch(m, x, y):
    """ops.BN_REBUILD_GRAD_Y on and ops.BN_DOUBLE_BACKWARD_FROM_GRAD_X off: the rebuilt grad_y formed with torch ops
    (ops.rebuild_grad_y) and passed to the double backward given grad_y, as before that op existed."""
    from jsigr_fast import ops
    from jsigr_fast._settings import device_setting

    with device_setting(ops.BN_DOUBLE_BACKWARD_FROM_GRAD_X, x.device.type, False):
        return _fused_jsigr_bn_rebuild(True)(m, x, y)


def _fd_graphs_kept(backend):
    """The fd J-SIGR loss with finite_difference.FREE_EARLY off: every perturbed forward's graph kept
    to the backward (the ablation of the early differentiation; restored afterwards)."""
    from jsigr_fast import finite_difference

    def loss(m, x, y):
        before = finite_difference.FREE_EARLY
        finite_difference.FREE_EARLY = False
        try:
            return jsigr_fast.loss(m, x, y, mode="fd", backend=backend)
        finally:
            finite_difference.FREE_EARLY = before
    return loss


def _fd_fused_rules(m, x, y):
    """The fused fd J-SIGR loss with fused.FIRST_ORDER_NATIVE off: its first-order passes through the
    conv / ReLU double-backward rules and the fused batch norm on every layout, instead of ATen's ops
    where fused.FIRST_ORDER_NATIVE / FIRST_ORDER_ATEN_BN pick them (the ablation of that choice; restored afterwards)."""
    from jsigr_fast import fused

    before = fused.FIRST_ORDER_NATIVE
    fused.FIRST_ORDER_NATIVE = False
    try:
        return jsigr_fast.loss(m, x, y, mode="fd", backend="fused")
    finally:
        fused.FIRST_ORDER_NATIVE = before


def _fused_jsigr_bn_rebuild(on: bool):
    """ops.BN_REBUILD_GRAD_Y forced on or off: batch_norm_backward's double backward rebuilding grad_y from its
    own output (on) or keeping it (off)."""
    return _fused_jsigr_with("ops", "BN_REBUILD_GRAD_Y", on)


def fused_jsigr_eager_penalty(m, x, y, *, generator=None):
    """Ablation, not a library mode: ``jsigr_fast.loss(m, x, y, backend="fused")`` at its defaults
    (lambda_m = lambda_j = 0.5, eps 0.3, the gradient saliency mask at beta 0.1, one projection; the same
    random draws in the same order) with the input-gradient penalty's parameter gradients taken inside
    the call (``torch.autograd.grad``, the forward's graph retained). Its create_graph VJP is then freed
    before the Jacobian projection's is built: one such graph alive at a time instead of two, for one
    more backward through the forward's graph (+2 units). Same loss value and parameter gradients; the
    loss's gradient with respect to x misses the penalty's part (not needed to train)."""
    from jsigr_fast import fused, ops, reference
    from jsigr_fast.functional import layer_rules, mask_builder
    from jsigr_fast.saliency import perturbed_input_gradient

    lam_m = lam_j = 0.5
    with layer_rules("fused"):
        g_hat = perturbed_input_gradient(m, x, y, eps=0.3, generator=generator)
    mask = mask_builder("fused")(None, g_hat, x, beta=0.1, quantile=None)
    params = [p for p in m.parameters() if p.requires_grad]
    with torch.enable_grad(), fused.fused_layers():
        xg, logits = reference.forward(m, x, y)
        per_sample = F.cross_entropy(logits, y, reduction="none")
        g = reference.vjp(per_sample.sum(), xg)
        sig = ops.masked_sq_norm(g, mask, compiled=True).mean()
        sig_grads = torch.autograd.grad(lam_m * sig, params, retain_graph=True)
        sig = sig.detach()
        del g  # the last reference to the penalty's VJP graph: freed here
        n, k = logits.shape
        v = reference.unit_sphere(n, k, like=logits, generator=generator)
        u = reference.vjp(logits, xg, v)
        jac = (k * ops.masked_sq_norm(u, None, compiled=True)).mean()
        eager = sum((p * gp).sum() for p, gp in zip(params, sig_grads))  # its gradient in p is gp
        return per_sample.mean() + lam_m * sig + lam_j * jac + (eager - eager.detach())


def make_methods(input_shape, *, backend: str = "reference", at_eps: float = AT_EPS,
                 at_alpha: float = AT_ALPHA, device="cpu", default_rng: bool = False) -> dict[str, Method]:
    """The timed methods, including the fused backend's when it is built for ``device`` and the
    finite-difference mode. Stateful ones (JARN's adaptor and discriminator, PGD's generator) live
    in the closures, built on the first batch's device; build a fresh dict per model. ``default_rng``:
    the attacks draw from the global generator instead of their own seeded one (a CUDA graph capture
    takes only the default CUDA generator: --cuda-graph)."""
    from jsigr_fast.attacks import pgd

    disc = "cifar" if len(input_shape) == 3 and input_shape[0] == 3 else "mnist"
    def _jarn(b):
        return _Lazy(lambda x: jsigr_fast.JARN(input_shape, discriminator=disc, backend=b).to(device=x.device,
                                                                                              dtype=x.dtype))

    jarn, jarn_f = _jarn(backend), _jarn("fused")  # own adaptor/discriminator state per timed method
    gen = (lambda x: None) if default_rng else _Lazy(lambda x: torch.Generator(device=x.device).manual_seed(0))

    def pgd_at7(m, x, y):
        x_adv = pgd(m, x, y, at_eps, alpha=at_alpha, steps=7, generator=gen(x))
        return F.cross_entropy(m(x_adv), y)

    def fgsm_at1(m, x, y):
        return F.cross_entropy(m(fgsm_random_start(m, x, y, at_eps, gen(x))), y)

    def jarn_at1(m, x, y):
        return jarn(x)(m, fgsm_random_start(m, x, y, at_eps, gen(x)), y)

    jarn_at1_f_state = _jarn("fused")

    def jarn_at1_fused(m, x, y):
        return jarn_at1_f_state(x)(m, fgsm_random_start(m, x, y, at_eps, gen(x)), y)

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
        "pgd_at7": Method("pgd_at7", "pgd_at7", pgd_at7, "PGD-AT7 (7 x 2/255, eps 8/255)"),
        "fgsm_at1": Method("fgsm_at1", "fgsm_at1", fgsm_at1, "FGSM-AT1 (random start, as --method fgsm_at)"),
        "jarn": Method("jarn", "jarn", lambda m, x, y: jarn(x)(m, x, y), f"JARN only ({disc} discriminator, {backend})"),
        "jarn_at1": Method("jarn_at1", "jarn_at1", jarn_at1, f"JARN-AT1 (JARN on the FGSM-AT1 example, {backend})"),
    }
    # finite differences (jsigr_fast.finite_difference): first-order autograd only, through the backend's layers
    methods["jsigr_fd"] = Method("jsigr_fd", "jsigr_fd",
                                 lambda m, x, y: jsigr_fast.loss(m, x, y, mode="fd", backend=backend),
                                 f"J-SIGR, finite differences (fd, {backend})")
    methods["jsigr_fd_kept"] = Method("jsigr_fd_kept", "jsigr_fd", _fd_graphs_kept(backend),
                                      f"J-SIGR, fd ({backend}), perturbed graphs kept (ablation)")
    # the fused backend (jsigr_fast.fused: fused BatchNorm, conv/ReLU double-backward rules), when built
    if "fused" in jsigr_fast.available_backends(device):
        methods.update({
            "double_backprop_fused": Method("double_backprop_fused", "double_backprop",
                                            lambda m, x, y: jsigr_fast.double_backprop(m, x, y, backend="fused"),
                                            "double backprop (fused)"),
            "jsigr_fused": Method("jsigr_fused", "jsigr", lambda m, x, y: jsigr_fast.loss(m, x, y, backend="fused"),
                                  "J-SIGR, projection (fused)"),
            # layout ablation (fused.CHANNELS_LAST): how much of the fused step's gain is the
            # channels-last activations, and what the same layout does to the standard and reference steps
            "standard_cl": Method("standard_cl", "standard",
                                  lambda m, x, y: F.cross_entropy(m(_channels_last(x)), y),
                                  "standard CE, channels-last input"),
            "jsigr_cl": Method("jsigr_cl", "jsigr",
                               lambda m, x, y: jsigr_fast.loss(m, _channels_last(x), y, backend="reference"),
                               "J-SIGR, projection (reference), channels-last input"),
            "jsigr_fused_nchw": Method("jsigr_fused_nchw", "jsigr", _fused_nchw_jsigr,
                                       "J-SIGR, projection (fused), NCHW activations"),
            "jarn_fused": Method("jarn_fused", "jarn", lambda m, x, y: jarn_f(x)(m, x, y),
                                 f"JARN only ({disc} discriminator, fused)"),
            "jarn_at1_fused": Method("jarn_at1_fused", "jarn_at1", jarn_at1_fused,
                                     "JARN-AT1 (JARN on the FGSM-AT1 example, fused)"),
            "jsigr_fd_fused": Method("jsigr_fd_fused", "jsigr_fd",
                                     lambda m, x, y: jsigr_fast.loss(m, x, y, mode="fd", backend="fused"),
                                     "J-SIGR, finite differences (fd, fused)"),
            "jsigr_fd_rules": Method("jsigr_fd_rules", "jsigr_fd", _fd_fused_rules,
                                     "J-SIGR, fd (fused), fused rules in every first-order pass (ablation)"),
            # batch norm's grad_y kept for the double backward vs rebuilt from grad_x (ops.BN_REBUILD_GRAD_Y),
            # both forced, whatever the device's default
            "jsigr_bn_keep_fused": Method("jsigr_bn_keep_fused", "jsigr", _fused_jsigr_bn_rebuild(False),
                                          "J-SIGR, projection (fused), batch norm keeps grad_y (ablation)"),
            "jsigr_bn_rebuild_fused": Method("jsigr_bn_rebuild_fused", "jsigr", _fused_jsigr_bn_rebuild(True),
                                             "J-SIGR, projection (fused), batch norm rebuilds grad_y"),
            "jsigr_aten_rules_fused": Method("jsigr_aten_rules_fused", "jsigr", _fused_jsigr_aten_layers,
                                             "J-SIGR, projection (fused), ATen's conv / ReLU (ablation)"),
            "jsigr_aten_bn_fused": Method(
                "jsigr_aten_bn_fused", "jsigr", _fused_jsigr_aten_bn,
                "J-SIGR, projection (fused), ATen's batch-norm forward / backward (ablation)"),
            "jsigr_bn_rebuild_torch_fused": Method(
                "jsigr_bn_rebuild_torch_fused", "jsigr", _fused_jsigr_rebuild_torch,
                "J-SIGR, projection (fused), batch norm rebuilds grad_y with torch ops (ablation)"),
            "jsigr_python_rules_fused": Method(
                "jsigr_python_rules_fused", "jsigr", _fused_jsigr_python_rules,
                "J-SIGR, projection (fused), conv / ReLU rules as Python Functions (ablation)"),
            # the conv after relu(batch_norm(h)) keeping its input vs recomputing it (fused.RECOMPUTE_CONV_INPUT),
            # both forced, whatever the device's default
            "jsigr_keep_input_fused": Method(
                "jsigr_keep_input_fused", "jsigr", _fused_jsigr_keep_input,
                "J-SIGR, projection (fused), convs keep their relu(batch_norm) input (ablation)"),
            "jsigr_recompute_input_fused": Method(
                "jsigr_recompute_input_fused", "jsigr", _fused_jsigr_recompute_input,
                "J-SIGR, projection (fused), convs recompute their relu(batch_norm) input"),
            "jsigr_rebuild_recompute_fused": Method(
                "jsigr_rebuild_recompute_fused", "jsigr", _fused_jsigr_rebuild_recompute,
                "J-SIGR, projection (fused), batch norm rebuilds grad_y, convs recompute their input"),
            "jsigr_eager_fused": Method("jsigr_eager_fused", "jsigr", fused_jsigr_eager_penalty,
                                        "J-SIGR, projection (fused), penalty gradients eager (ablation)"),
            "jsigr_hutchinson_fused": Method(
                "jsigr_hutchinson_fused", "jsigr_hutchinson",
                lambda m, x, y: jsigr_fast.loss(m, x, y, jacobian="hutchinson", backend="fused"),
                "J-SIGR, Hutchinson JVP (fused)"),
        })
    return methods


STEP_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def add_step_arguments(p, *, threads: bool = True):
    """The arguments of the step benchmarks (bench_step, bench_fused, bench_vjp, bench_probes): model,
    batch, device, dtype (a name in STEP_DTYPES), output folder, and torch's thread count."""
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(STEP_DTYPES))
    if threads:
        p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=None, help="folder for the JSON and markdown records")


def apply_step_arguments(a) -> torch.dtype:
    """Set the thread count if one was given; return the dtype named by ``--dtype``."""
    if getattr(a, "threads", None):
        torch.set_num_threads(a.threads)
    return STEP_DTYPES[a.dtype]


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


def time_graphed_steps(model, opt, loss_fn, x, y, *, repeats=5, device="cpu", _graph_factory=None):
    """:func:`time_steps` for the step captured as a CUDA graph (jsigr_fast.graphed_step): its warm-up and
    capture are not timed; each timed call copies the batch in, checks it (one host read) and replays.
    A step that cannot be captured gives ``{"error": message}`` instead of stopping the benchmark."""
    from jsigr_fast.cuda_graphs import CaptureError, GraphedStep

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        step = GraphedStep(model, opt, loss_fn, x, y, _graph_factory=_graph_factory)
    except CaptureError as e:
        return {"error": e.reason}
    step(x, y)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(x, y)
        sync(device)
        times.append(time.perf_counter() - t0)
    t = torch.tensor(times, dtype=torch.float64)
    out = {"median_s": float(t.quantile(0.5)), "p20_s": float(t.quantile(0.2)), "p80_s": float(t.quantile(0.8)),
           "repeats": repeats}
    if cuda:
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del step
    if cuda:
        torch.cuda.empty_cache()  # the graph's private memory pool
    return out


def gpu_kernel_impls(device) -> list[str | None]:
    """The GPU implementations of the batch-norm and mask ops to time side by side on ``device``:
    "cuda" when the build compiled them, "triton" when Triton is installed; [None] off the GPU."""
    if torch.device(device).type != "cuda":
        return [None]
    from importlib.util import find_spec

    impls = ["cuda"] if jsigr_fast.ops._COMPILED_CUDA else []
    return impls + (["triton"] if find_spec("triton") is not None else [])


class using_gpu_kernels:
    """``with using_gpu_kernels(impl):`` run under ``jsigr_fast.ops.use_gpu_kernels(impl)``, then restore
    the previous choice (None: leave it as it is)."""

    def __init__(self, impl):
        self.impl = impl

    def __enter__(self):
        self.before = jsigr_fast.ops.gpu_kernels()
        if self.impl is not None:
            jsigr_fast.ops.use_gpu_kernels(self.impl)
        return self

    def __exit__(self, *exc):
        if self.impl is not None:
            jsigr_fast.ops._apply_gpu_kernels(self.before)
        return False


def uncommitted_changes() -> bool | None:
    """Whether the code differs from HEAD (then the numbers are of uncommitted code); None when git
    cannot tell. Result records under bench/results/ are not code and do not count."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                              ":(exclude,top)bench/results"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=30)
        return bool(out.stdout.strip()) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


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
    # every record's markdown prints info["commit"]: numbers of code that is not that commit say so
    info["uncommitted_changes"] = uncommitted_changes()
    if info["commit"] and info["uncommitted_changes"]:
        info["commit"] += " + uncommitted changes"
    if dev.type == "cuda":
        info["device"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
        info["gpu_kernels"] = jsigr_fast.ops.gpu_kernels()
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
