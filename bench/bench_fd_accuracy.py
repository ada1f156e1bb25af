"""How far is ``mode="fd"`` from the exact penalties? An accuracy benchmark, not a timing one.

For each quantity J-SIGR penalises, the finite-difference value at several steps h, in float32 and
under low-precision autocast, relative to the exact (double-backprop) value in float32 on the same
batch with the same random draws:

* the input-gradient penalty ``mean_n ||g_n||²``, and the cosine between its fd and exact parameter
  gradients (on ReLU networks the fd gradient also carries the kinks crossed between x and
  x + h d, so it does not tend to the exact one: jsigr_fast/finite_difference.py);
* the Jacobian norm ``mean_n ||J_n||_F²`` by the projection and by the Hutchinson estimator, and with
  ``--exact-jacobian`` by the exact one (K directions per sample; N·K VJPs under train-mode
  BatchNorm, so keep the batch small).

The exact path under the same autocast is listed alongside. The model is in train mode (batch
statistics), as in training (``--eval-mode``: running statistics); running statistics are not updated.

    python bench/bench_fd_accuracy.py --out bench/results                     # CPU, ResNet-20, batch 128
    python bench/bench_fd_accuracy.py --activation gelu --out bench/results   # a smooth network
    python bench/bench_fd_accuracy.py --device cuda --out bench/results

Results: ``<out>/fd_accuracy_<device>_<model>[_<activation>]_b<batch>.{md,json}``.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from steps import conditions, make_setup, publish  # noqa: E402

import jsigr_fast  # noqa: E402

TERMS = ("input_grad", "projection", "hutchinson")  # and "exact" with --exact-jacobian
LABELS = {"input_grad": "input-gradient penalty", "projection": "Jacobian, projection",
          "hutchinson": "Jacobian, Hutchinson", "exact": "Jacobian, exact"}
LOW = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def evaluate(model, x, y, term: str, *, mode: str, h: float, low: torch.dtype | None, grad: bool):
    """The term's value (and, with ``grad``, its parameter gradient as one flat float64 vector)."""
    gen = torch.Generator(device=x.device).manual_seed(0)
    with torch.autocast(x.device.type, dtype=low or torch.bfloat16, enabled=low is not None), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the low-precision fd warning: measured here
        if term == "input_grad":
            out = jsigr_fast.input_gradient_penalty(model, x, y, mode=mode, fd_step=h)
        else:
            out = jsigr_fast.jacobian_norm(model, x, estimator=term, mode=mode, fd_step=h, generator=gen)
    value = float(out.detach())
    if not grad:
        return value, None
    params = [p for p in model.parameters() if p.requires_grad]
    gs = torch.autograd.grad(out, params, allow_unused=True)
    return value, torch.cat([(g if g is not None else torch.zeros_like(p)).double().reshape(-1)
                             for g, p in zip(gs, params)])


def pct(v: float | None) -> str:
    """A relative error as a signed percentage, 10 or more as the ratio to the exact value."""
    if v is None:
        return "refused"
    return f"{v:+.2%}" if abs(v) < 10 else f"{v + 1:.0f}x"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20")
    p.add_argument("--activation", default=None, help="the model's activation (default: the model's own)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", default="0.001,0.01,0.03,0.1", help="fd_step values")
    p.add_argument("--low", default="bfloat16", choices=sorted(LOW) + ["none"], help="the autocast dtype")
    p.add_argument("--exact-jacobian", action="store_true", help="also the exact Jacobian estimator")
    p.add_argument("--eval-mode", action="store_true", help="the model in eval mode (running statistics)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    steps = [float(s) for s in a.steps.split(",")]
    kw = {"activation": a.activation} if a.activation else {}
    model, _opt, x, y = make_setup(a.model, a.batch, device=a.device, **kw)
    model.train(not a.eval_mode)
    cond = conditions(a.device)
    cond.update(model=a.model, activation=a.activation, batch=a.batch, steps=steps, low=a.low,
                train_mode=not a.eval_mode)

    precisions = [("float32", None)] + ([] if a.low == "none" else [(a.low, LOW[a.low])])
    rows = [("exact", prec, None) for prec in precisions] + [("fd", prec, h) for prec in precisions for h in steps]
    terms = TERMS + (("exact",) if a.exact_jacobian else ())
    exact = {t: evaluate(model, x, y, t, mode="autograd", h=0.01, low=None, grad=t == "input_grad") for t in terms}
    results = []
    for mode, (pname, low), h in rows:
        rec = {"mode": mode, "precision": pname, "fd_step": h}
        for t in terms:
            try:
                value, g = evaluate(model, x, y, t, mode="autograd" if mode == "exact" else "fd", h=h or 0.01,
                                    low=low, grad=t == "input_grad")
            except ValueError as exc:  # fd refuses the exact estimator under train-mode BatchNorm
                rec[t], rec[t + "_rel_err"], rec[t + "_refused"] = None, None, str(exc)
                continue
            rec[t] = value
            rec[t + "_rel_err"] = value / exact[t][0] - 1
            if g is not None:
                rec["input_grad_cos"] = float(torch.nn.functional.cosine_similarity(g, exact[t][1], dim=0))
        results.append(rec)
        print(f"  {mode} {pname} h={h}: " + ", ".join(f"{t} {pct(rec[t + '_rel_err'])}" for t in terms), flush=True)

    act = f", {a.activation}" if a.activation else ""
    lines = [f"### mode=\"fd\" against the exact penalties — {a.model}{act}, batch {a.batch}, "
             f"{'eval' if a.eval_mode else 'train'} mode, "
             f"{cond['device']}", "",
             f"torch {cond['torch']}, commit {cond['commit']}, {cond['date']}. Relative error of each value against "
             f"the exact (double-backprop) float32 value with the same random draws: "
             + ", ".join(f"{LABELS[t]} {exact[t][0]:.4g}" for t in terms)
             + f" (one draw each). ∇θ cosine: between the input-gradient penalty's "
             f"parameter gradients, this row's and the exact float32 one. `{a.low}` rows run under autocast.", "",
             "| path | forwards | fd_step | input-gradient penalty | ∇θ cosine | "
             + " | ".join(LABELS[t] for t in terms[1:]) + " |", "|---|---|---:|---:|---:|" + "---:|" * (len(terms) - 1)]
    for r in results:
        lines.append(f"| {r['mode']} | {r['precision']} | {'' if r['fd_step'] is None else r['fd_step']} | "
                     f"{pct(r['input_grad_rel_err'])} | {r['input_grad_cos']:.3f} | "
                     + " | ".join(pct(r[t + "_rel_err"]) for t in terms[1:]) + " |")
    lines += ["", "An error of 10 or more is shown as the value over the exact one (e.g. `134x`); \"refused\": fd "
              "raises for the exact estimator under train-mode BatchNorm (jsigr_fast.finite_difference)."]
    name = (f"fd_accuracy_{torch.device(a.device).type}_{a.model}{'_' + a.activation if a.activation else ''}"
            f"_b{a.batch}{'_exact' if a.exact_jacobian else ''}{'_eval' if a.eval_mode else ''}")
    publish(lines, a.out, name, {"conditions": cond, "exact": {t: exact[t][0] for t in terms}, "rows": results})


if __name__ == "__main__":
    main()
