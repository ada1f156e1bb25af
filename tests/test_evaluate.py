"""Tests for jsigr_fast.evaluate (robustness tables, checkpoints, CLI) and jsigr_fast.jacobian_layers.

Accuracies under attack are recomputed by hand on affine models (closed-form input gradients),
per-layer Jacobian norms against full Jacobians from torch.autograd loops and against closed
forms, rho_adv against DeepFool's exact first step on an affine binary classifier.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from jsigr_fast import evaluate as E
from jsigr_fast.jacobian_layers import default_layers, format_layer_markdown, layer_jacobian_norms

D, K = 12, 3


class Affine(nn.Module):
    """z = W flatten(x) + b."""

    def __init__(self, seed, d=D, k=K):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(torch.randn(k, d, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(0.1 * torch.randn(k, generator=g, dtype=torch.float64))

    def forward(self, x):
        return x.flatten(1) @ self.W.T + self.b


def data(n=64, seed=0, d=D, k=K):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 3, d // 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    return x, y


def hand_grad(model, x, y):
    """∇ₓ CE_n = Wᵀ (softmax(z_n) − onehot(y_n)) for an affine model, reshaped like x."""
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
        p[torch.arange(len(y)), y] -= 1
        return (p @ model.W).reshape(x.shape)


def hand_acc(model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


# ----------------------------------------------------------------------------------------------
# mean ± std, attack specs, formatting, CSV
# ----------------------------------------------------------------------------------------------
def test_mean_std_and_formatting_on_known_numbers():
    m, s = E.mean_std([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6) and s == pytest.approx(0.1)  # sample std, n - 1
    assert E.mean_std([0.9]) == (0.9, 0.0)
    assert E.mean_std([2.0, 4.0])[1] == pytest.approx(math.sqrt(2.0))
    assert E.format_mean_std([0.5, 0.6, 0.7]) == "60.0 ± 10.0"
    assert E.format_mean_std([0.975]) == "97.5"
    assert E.format_mean_std([0.5, 0.6, 0.7], percent=False, digits=2) == "0.60 ± 0.10"
    with pytest.raises(ValueError):
        E.mean_std([])


def test_parse_attack():
    a = E.parse_attack("pgd:eps=8/255,steps=20,alpha=2/255,restarts=2")
    assert (a.name, a.eps, a.steps, a.alpha, a.restarts, a.norm) == ("pgd", 8 / 255, 20, 2 / 255, 2, "linf")
    assert a.stochastic and a.label == "PGD-20 (ε=8/255, 2 restarts)"
    b = E.parse_attack("pgd", eps=0.3, steps=40)
    assert (b.eps, b.steps, b.alpha) == (0.3, 40, None) and b.label == "PGD-40 (ε=0.3)"
    assert not E.parse_attack("pgd:eps=0.1,random_start=0").stochastic
    assert E.parse_attack("FGSM", eps=0.1).label == "FGSM (ε=0.1)"
    assert E.parse_attack("clean", eps=0.1) == E.AttackSpec("clean")
    assert E.parse_attack("mi-fgsm:eps=0.1,steps=5").name == "mi_fgsm"
    for bad, match in [("nope", "unknown attack"), ("pgd:eps=0.1,foo=1", "unknown attack option"),
                       ("fgsm", "needs eps"), ("pgd:eps=abc", "not a number"), ("pgd:eps", "key=value"),
                       ("fgsm:eps=0.1,norm=l2", "norm"), ("pgd:eps=0.1,steps=0", "steps")]:
        with pytest.raises(ValueError, match=match):
            E.parse_attack(bad)


def test_clean_refuses_options_in_its_spec_but_ignores_the_keyword_defaults():
    # the dataset's budget, passed to every attack as keyword defaults, does not concern clean
    assert E.parse_attack("clean", eps=8 / 255, steps=20, alpha=2 / 255) == E.AttackSpec("clean")
    assert E.parse_attack("clean:", eps=0.1) == E.AttackSpec("clean")
    # options written for clean itself were silently dropped, labelling the column with what it did not do
    for spec, shown in [("clean:eps=8/255", "eps=8/255"), ("clean:steps=5,norm=l2", "steps=5, norm=l2")]:
        with pytest.raises(ValueError, match=f"attack 'clean' takes no options, got {shown} in '{spec}'"):
            E.parse_attack(spec, eps=0.1, steps=10)


@pytest.mark.parametrize("spec, shown, takes", [
    ("fgsm:steps=3", "steps=3", "eps"),
    ("fgsm:eps=0.1,alpha=0.01,norm=linf", "alpha=0.01, norm=linf", "eps"),
    ("mi_fgsm:eps=0.1,restarts=2", "restarts=2", "eps, steps, alpha"),
    ("ni-fgsm:eps=0.1,random_start=0", "random_start=0", "eps, steps, alpha"),
    ("abi_fgm:eps=0.1,norm=linf", "norm=linf", "eps, steps, alpha"),
])
def test_every_attack_refuses_options_it_does_not_use(spec, shown, takes):
    # fgsm:steps=3 used to be accepted, the steps ignored, and then refused as a duplicate of fgsm
    name = spec.partition(":")[0].replace("-", "_")
    with pytest.raises(ValueError, match=re.escape(f"attack '{name}' takes only {takes}, got {shown} in '{spec}'")):
        E.parse_attack(spec, eps=0.1, steps=10, alpha=0.01)


def test_keyword_defaults_apply_only_where_the_attack_uses_them():
    assert E.parse_attack("fgsm", eps=0.1, steps=20, alpha=0.01) == E.AttackSpec("fgsm", eps=0.1)
    assert E.parse_attack("pgd", eps=0.1, steps=20, alpha=0.01) == E.AttackSpec("pgd", eps=0.1, steps=20, alpha=0.01)
    # the momentum attacks take the budget's steps but keep their own step size
    assert E.parse_attack("mi_fgsm", eps=0.1, steps=20, alpha=0.01) == E.AttackSpec("mi_fgsm", eps=0.1, steps=20)
    spec = E.parse_attack("pgd:norm=l2,restarts=2,steps=5,alpha=0.2,eps=1", eps=0.1, steps=20, alpha=0.01)
    assert spec == E.AttackSpec("pgd", eps=1.0, steps=5, alpha=0.2, norm="l2", restarts=2)


def test_attacks_that_differ_only_in_the_step_size_or_random_start_get_their_own_columns():
    """Labels name eps, steps, norm and restarts; the step size is added only where two attacks
    would otherwise share a label (so the usual columns keep their names), a missing random start
    always. Two attacks that craft the same examples are refused."""
    specs = [E.parse_attack(s) for s in ("pgd:eps=8/255,steps=10,alpha=1/255", "pgd:eps=8/255,steps=10,alpha=3/255",
                                         "pgd:eps=8/255,steps=10", "fgsm:eps=8/255", "clean")]
    # the third takes PGD's default step 2.5 eps / steps = 2/255, shown as such
    assert E.attack_labels(specs) == ["PGD-10 (ε=8/255, α=1/255)", "PGD-10 (ε=8/255, α=3/255)",
                                      "PGD-10 (ε=8/255, α=2/255)", "FGSM (ε=8/255)", "clean"]
    assert E.attack_labels(specs[:1] + specs[3:]) == ["PGD-10 (ε=8/255)", "FGSM (ε=8/255)", "clean"]  # unchanged
    assert E.parse_attack("pgd:eps=0.1,random_start=0").label == "PGD-10 (ε=0.1, no random start)"
    # alpha 2.5 eps / steps is PGD's default: the same attack as leaving alpha out
    for same in (["pgd:eps=8/255,steps=10", "pgd:eps=8/255,steps=10,alpha=2/255"],
                 ["mi_fgsm:eps=0.1,steps=10", "mi_fgsm:eps=0.1"], ["clean", "clean"]):
        with pytest.raises(ValueError, match="attacks #1 and #2 are the same attack"):
            E.attack_labels([E.parse_attack(s) for s in same])

    a = Affine(5)
    x, y = data(seed=2)
    big, small = (E.AttackSpec("pgd", eps=0.1, steps=3, alpha=a_) for a_ in (0.1, 0.01))
    det = E.AttackSpec("pgd", eps=0.1, steps=3, alpha=0.1, random_start=False)
    rows = E.robustness_table({"a": a}, x, y, [big, small, det], seeds=[0])
    assert [r.attack for r in rows] == ["PGD-3 (ε=0.1, α=0.1)", "PGD-3 (ε=0.1, α=0.01)",
                                        "PGD-3 (ε=0.1, no random start)"]
    for r, spec in zip(rows, (big, small, det)):
        assert r.values == (hand_acc(a, E.craft(a, x, y, spec, generator=torch.Generator().manual_seed(0)), y),)
    assert rows[0].values != rows[1].values  # the step size matters here: two columns, two numbers
    header = E.format_markdown(rows).splitlines()[0]
    assert header.count("PGD-3") == 3


def test_eval_cli_keeps_attacks_apart_and_refuses_duplicates(tmp_path, capsys):
    import json

    from jsigr_fast.cli import main

    torch.save(_train_ckpt(_digits_model()), tmp_path / "ok.pt")
    out = tmp_path / "out"
    assert main(["eval", str(tmp_path / "ok.pt"), "--limit", "8", "--attack", "pgd:eps=0.1,steps=2,alpha=0.05",
                 "pgd:eps=0.1,steps=2,alpha=0.01", "--out", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    labels = ["PGD-2 (ε=0.1, α=0.05)", "PGD-2 (ε=0.1, α=0.01)"]
    assert [a["label"] for a in record["attacks"]] == labels
    assert [r["attack"] for r in record["accuracy"]] == labels
    assert [r.attack for r in E.read_csv(str(out / "accuracy.csv"))] == labels
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "ok.pt"), "--limit", "8", "--attack", "pgd:eps=0.1,steps=2",
                 "pgd:steps=2,eps=0.1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--attack: 'pgd:eps=0.1,steps=2' and 'pgd:steps=2,eps=0.1' are the same attack" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def _rows():
    return [
        E.Row("robustness", "a", "a", "clean", 0.0, (0.975,), (0,)),
        E.Row("robustness", "a", "a", "PGD-3 (ε=0.1)", 0.1, (0.5, 0.6, 0.7), (0, 1, 2)),
        E.Row("robustness", "b", "b", "clean", 0.0, (0.9,), (0,)),
        E.Row("robustness", "b", "b", "PGD-3 (ε=0.1)", 0.1, (0.8, 0.8, 0.8), (0, 1, 2)),
        E.Row("transfer", "a", "b", "PGD-3 (ε=0.1)", 0.1, (0.85, 0.95, 0.9), (0, 1, 2)),
        E.Row("transfer", "b", "a", "PGD-3 (ε=0.1)", 0.1, (0.1, 0.2, 0.3), (0, 1, 2)),
    ]


def test_format_markdown_pivot_and_transfer_matrix():
    lines = E.format_markdown(_rows()).splitlines()
    assert lines[:4] == ["| model | clean | PGD-3 (ε=0.1) |", "|---|---:|---:|",
                         "| a | 97.5 | 60.0 ± 10.0 |", "| b | 90.0 | 80.0 ± 0.0 |"]
    i = lines.index("| crafted on ↓ / scored by → | a | b |")
    assert lines[i + 2:i + 4] == ["| a | 60.0 ± 10.0 | 90.0 ± 5.0 |", "| b | 20.0 ± 10.0 | 80.0 ± 0.0 |"]


def test_csv_round_trip(tmp_path):
    rows = _rows() + [E.Row("robustness", "c,with comma", "c,with comma", 'x "q"', 1 / 3, (1 / 3, 2 / 7), (5, 6))]
    path = E.write_csv(rows, str(tmp_path / "acc.csv"))
    assert E.read_csv(path) == rows
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not an accuracy CSV"):
        E.read_csv(str(tmp_path / "bad.csv"))


# ----------------------------------------------------------------------------------------------
# robustness_table against hand computations
# ----------------------------------------------------------------------------------------------
def test_fgsm_and_transfer_accuracy_by_hand():
    a, b = Affine(1), Affine(2)
    x, y = data()
    eps = 0.07
    rows = E.robustness_table({"a": a, "b": b}, x, y, ["clean", f"fgsm:eps={eps}"], seeds=[0, 1], transfer=True,
                              batch_size=16)
    got = {(r.table, r.source, r.target, r.attack): r.values for r in rows}
    xa = (x + eps * hand_grad(a, x, y).sign()).clamp(0, 1)
    xb = (x + eps * hand_grad(b, x, y).sign()).clamp(0, 1)
    assert got["robustness", "a", "a", "clean"] == (hand_acc(a, x, y),)  # deterministic: one value
    assert got["robustness", "b", "b", "clean"] == (hand_acc(b, x, y),)
    assert got["robustness", "a", "a", "FGSM (ε=0.07)"] == (hand_acc(a, xa, y),)
    assert got["transfer", "a", "b", "FGSM (ε=0.07)"] == (hand_acc(b, xa, y),)
    assert got["transfer", "b", "a", "FGSM (ε=0.07)"] == (hand_acc(a, xb, y),)
    assert hand_acc(a, xa, y) < hand_acc(a, x, y)  # the attack does something
    assert len(rows) == 2 + 2 + 2  # clean has no transfer rows


def test_pgd_without_random_start_by_hand_and_seeded_pgd():
    a = Affine(3)
    x, y = data(seed=1)
    eps, alpha, steps = 0.05, 0.02, 4
    xa = x.clone()
    for _ in range(steps):
        xa = (x + (xa + alpha * hand_grad(a, xa, y).sign() - x).clamp(-eps, eps)).clamp(0, 1)
    spec = E.AttackSpec("pgd", eps=eps, steps=steps, alpha=alpha, random_start=False)
    (row,) = E.robustness_table({"a": a}, x, y, [spec], seeds=[0, 1, 2])
    assert row.values == (hand_acc(a, xa, y),) and row.seeds == (0,)

    rand = E.AttackSpec("pgd", eps=eps, steps=steps, alpha=alpha)
    (r1,) = E.robustness_table({"a": a}, x, y, [rand], seeds=[0, 1, 2])
    (r2,) = E.robustness_table({"a": a}, x, y, [rand], seeds=[0, 1, 2])
    assert len(r1.values) == 3 and r1.seeds == (0, 1, 2) and r1 == r2  # one value per seed, reproducible
    # Each seed's value is the accuracy on examples within the budget.
    x_adv = E.craft(a, x, y, rand, generator=torch.Generator().manual_seed(1))
    assert float((x_adv - x).abs().max()) <= eps + 1e-12
    assert r1.values[1] == hand_acc(a, x_adv, y)


def test_robustness_table_bad_arguments():
    x, y = data()
    with pytest.raises(TypeError):
        E.robustness_table({}, x, y, ["clean"])
    with pytest.raises(TypeError):
        E.robustness_table({"a": "not a model"}, x, y, ["clean"])
    with pytest.raises(ValueError):
        E.robustness_table({"a": Affine(0)}, x, y, ["clean"], seeds=[])


def test_rho_adv_table_affine_binary_closed_form():
    m = Affine(4, k=2)
    x, _ = data(n=10, k=2)
    (row,) = E.rho_adv_table({"m": m}, x, batch_size=4, overshoot=0.02)
    with torch.no_grad():
        z = m(x)
        w = m.W[1] - m.W[0]
        f = (z[:, 1] - z[:, 0]).abs()
        ratio = 1.02 * f / w.norm() / x.flatten(1).norm(dim=1)
    assert row.n_success == row.n_total == 10
    assert row.rho == pytest.approx(float(ratio.mean()), rel=1e-9)
    assert "| m | " in E.format_rho_markdown([row])


# ----------------------------------------------------------------------------------------------
# per-layer Jacobian norms
# ----------------------------------------------------------------------------------------------
class TinyConv(nn.Module):
    def __init__(self, c=2, bn=False):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(c, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(3, 2, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * 2 * 2, 4)

    def forward(self, x):
        h = F.gelu(self.bn(self.conv1(x)))
        return self.fc(torch.tanh(self.conv2(h)).flatten(1))


def oracle_layer_norms(model, x):
    """mean_n ||d h_l(x_n)/d x_n||_F^2 from one autograd.grad call per (sample, output unit)."""
    outs = {}
    hooks = [getattr(model, n).register_forward_hook(lambda mod, i, o, n=n: outs.__setitem__(n, o))
             for n in ("conv1", "conv2", "fc")]
    xg = x.detach().clone().requires_grad_(True)
    model(xg)
    for h in hooks:
        h.remove()
    res = {}
    for name, h in outs.items():
        flat = h.flatten(1)
        tot = torch.zeros(x.shape[0], dtype=torch.float64)
        for n in range(x.shape[0]):
            for u in range(flat.shape[1]):
                (g,) = torch.autograd.grad(flat[n, u], xg, retain_graph=True)
                tot[n] += g[n].pow(2).sum()  # the row of sample n's own Jacobian
                assert float(g.abs().sum() - g[n].abs().sum()) == 0.0  # eval mode: no cross-sample terms
        res[name] = float(tot.mean())
    return res, {n: o[0].numel() for n, o in outs.items()}


def test_layer_jacobian_norms_match_autograd_loops():
    model = TinyConv().double().eval()
    x = torch.rand(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want, units = oracle_layer_norms(model, x)
    exact = {r.name: r for r in layer_jacobian_norms(model, x, estimator="exact", batch_size=2)}
    assert list(exact) == ["conv1", "conv2", "fc"] == default_layers(model)
    for name in want:
        assert exact[name].sq_fro == pytest.approx(want[name], rel=1e-10)
        assert exact[name].units == units[name]
        assert exact[name].sq_fro_per_unit == pytest.approx(want[name] / units[name], rel=1e-10)
    hutch = {r.name: r for r in layer_jacobian_norms(model, x, n_proj=600,
                                                     generator=torch.Generator().manual_seed(1))}
    for name in want:  # unbiased; ~2-4 % relative noise with 3 x 600 probes
        assert hutch[name].sq_fro == pytest.approx(want[name], rel=0.15)
    # The last layer is the logits: the model's mean ||J||_F^2.
    import jsigr_fast
    assert exact["fc"].sq_fro == pytest.approx(float(jsigr_fast.jacobian_norm(model, x, estimator="exact").detach()), rel=1e-10)


def test_layer_jacobian_hutchinson_closed_form_and_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.rand(50, 6, dtype=torch.float64)
    (first, _) = layer_jacobian_norms(model, x, n_proj=40, generator=torch.Generator().manual_seed(0))
    w2 = float(model[1].weight.detach().pow(2).sum())  # the first layer's Jacobian is W for every x
    assert first.name == "1" and first.units == 5
    assert first.sq_fro == pytest.approx(w2, rel=0.1)
    (only,) = layer_jacobian_norms(model, x[:2], estimator="exact", layers=["1"])
    assert only.sq_fro == pytest.approx(w2, rel=1e-12)
    with pytest.raises(ValueError, match="unknown layer"):
        layer_jacobian_norms(model, x, layers=["nope"])
    with pytest.raises(ValueError, match="estimator"):
        layer_jacobian_norms(model, x, estimator="magic")
    bn = TinyConv(bn=True).double().train()
    x4 = torch.rand(4, 2, 4, 4, dtype=torch.float64)
    before = bn.bn.running_mean.clone()
    with pytest.raises(ValueError, match="eval"):
        layer_jacobian_norms(bn, x4, estimator="exact")
    layer_jacobian_norms(bn, x4, n_proj=2)  # train-mode BN: allowed, running stats untouched
    assert torch.equal(bn.bn.running_mean, before)
    text = format_layer_markdown({"m": layer_jacobian_norms(model, x[:4], n_proj=2)})
    assert text.splitlines()[0] == "| layer | units | m ‖J‖²_F | m per unit |" and "| 1 (Linear) | 5 |" in text


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
def _digits_model(seed=0):
    from jsigr_fast.models import get_model
    torch.manual_seed(seed)
    return get_model("digits_cnn", activation="gelu")


def _train_ckpt(model, **cfg):
    return {"model": model.state_dict(), "config": {"model": "digits_cnn", "model_kwargs": {"activation": "gelu"},
                                                    "dataset": "digits", **cfg}}


def test_load_checkpoint_layouts(tmp_path):
    m = _digits_model()
    x = torch.rand(5, 1, 8, 8)
    ref = m.eval()(x)
    torch.save(_train_ckpt(m, lr=0.1), tmp_path / "train.pt")
    lm = E.load_checkpoint(str(tmp_path / "train.pt"))
    assert (lm.arch, lm.dataset, lm.model_kwargs) == ("digits_cnn", "digits", {"activation": "gelu"})
    assert not lm.model.training and torch.allclose(lm.model(x), ref)

    torch.save(m.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="--model"):
        E.load_checkpoint(str(tmp_path / "bare.pt"))
    lm = E.load_checkpoint(str(tmp_path / "bare.pt"), model="digits_cnn", dataset="digits",
                           model_kwargs={"activation": "gelu"})
    assert torch.allclose(lm.model(x), ref)

    ddp = {"model": {"module." + k: v for k, v in m.state_dict().items()},
           "config": {"model": {"name": "digits_cnn", "kwargs": {"activation": "gelu"}}, "dataset": "digits"}}
    torch.save(ddp, tmp_path / "ddp.pt")
    assert torch.allclose(E.load_checkpoint(str(tmp_path / "ddp.pt")).model(x), ref)

    import jsigr_fast
    crit = jsigr_fast.JSIGR((1, 8, 8), discriminator="mnist")
    with torch.no_grad():
        crit.adaptor.conv.weight.mul_(3.0)
    torch.save({**_train_ckpt(m), "criterion": crit.state_dict()}, tmp_path / "jsigr.pt")
    lm = E.load_checkpoint(str(tmp_path / "jsigr.pt"))
    g = torch.randn(2, 1, 8, 8)
    assert lm.adaptor is not None and torch.allclose(lm.adaptor(g), crit.adaptor(g))
    assert E.load_checkpoint(str(tmp_path / "train.pt")).adaptor is None


def test_load_train_layer_checkpoint(tmp_path):
    """The layout jsigr_fast.train.checkpoint writes: arch = exact constructor arguments, the
    criterion's state under method/criterion, the optimizer's state alongside."""
    import jsigr_fast
    from jsigr_fast.models import get_model

    torch.manual_seed(1)
    kwargs = {"num_classes": 10, "in_channels": 1, "mean": [0.5], "std": [0.25], "input_size": 8, "activation": "silu"}
    m = get_model("digits_cnn", **kwargs)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.rand(2, 1, 8, 8)).sum().backward()
    opt.step()
    crit = jsigr_fast.JSIGR((1, 8, 8), discriminator="mnist")
    with torch.no_grad():
        crit.adaptor.conv.bias.fill_(0.25)
    ckpt = {"format": "jsigr_fast.train/1", "versions": {"torch": str(torch.__version__)},
            "config": {"method": "jsigr", "dataset": "digits", "data_root": None, "model": None,
                       "model_args": {"activation": "silu"}, "synthetic": False},
            "arch": {"model": "digits_cnn", "kwargs": kwargs}, "epoch": 3, "batch": 0, "global_step": 30,
            "model": m.state_dict(), "optimizer": opt.state_dict(), "scheduler": None,
            "method": {"criterion": crit.state_dict()}, "rng": {"world_size": 1, "ranks": []}, "counters": {}}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.save(ckpt, tmp_path / "a" / "last.pt")
    torch.save(ckpt, tmp_path / "b" / "last.pt")
    lm = E.load_checkpoint(str(tmp_path / "a" / "last.pt"))
    x = torch.rand(3, 1, 8, 8)
    assert lm.dataset == "digits" and lm.model_kwargs == kwargs
    assert torch.allclose(lm.model(x), m.eval()(x))  # mean/std 0.5/0.25 and SiLU came from arch
    g = torch.randn(2, 1, 8, 8)
    assert lm.adaptor is not None and torch.allclose(lm.adaptor(g), crit.adaptor(g))
    assert E._unique_names([str(tmp_path / "a" / "last.pt"), str(tmp_path / "b" / "last.pt")], None) == \
        ["a/last", "b/last"]
    ckpt["config"]["synthetic"] = True
    torch.save(ckpt, tmp_path / "syn.pt")
    lm = E.load_checkpoint(str(tmp_path / "syn.pt"))
    assert lm.dataset == "synthetic" and lm.dataset_kwargs == {"shape": [1, 8, 8], "num_classes": 10}


def test_load_checkpoint_errors(tmp_path):
    m = _digits_model()
    with pytest.raises(FileNotFoundError, match="no such file"):
        E.load_checkpoint(str(tmp_path / "missing.pt"))
    torch.save(m, tmp_path / "pickled_module.pt")  # a whole pickled object: refused, never executed
    with pytest.raises(ValueError, match="weights_only"):
        E.load_checkpoint(str(tmp_path / "pickled_module.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights_only"):
        E.load_checkpoint(str(tmp_path / "junk.pt"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a state_dict"):
        E.load_checkpoint(str(tmp_path / "list.pt"))
    torch.save({"epoch": 3, "optimizer": {}}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="expected a state_dict"):
        E.load_checkpoint(str(tmp_path / "odd.pt"))
    torch.save(_train_ckpt(m), tmp_path / "ok.pt")
    with pytest.raises(ValueError, match="do not fit"):
        E.load_checkpoint(str(tmp_path / "ok.pt"), model="digits_cnn", model_kwargs={"channels": [16, 64]})
    with pytest.raises(ValueError, match="cannot build"), pytest.warns(UserWarning, match="overrides"):
        E.load_checkpoint(str(tmp_path / "ok.pt"), model="no_such_net")
    sd = dict(m.state_dict())
    sd.pop("fc.bias")
    torch.save({"model": sd, "config": {"model": "digits_cnn", "dataset": "digits"}}, tmp_path / "missing_key.pt")
    with pytest.raises(ValueError, match="missing keys"):
        E.load_checkpoint(str(tmp_path / "missing_key.pt"))
    with pytest.warns(UserWarning, match="overrides"):
        E.load_checkpoint(str(tmp_path / "ok.pt"), dataset="mnist", model_kwargs={"input_size": 8})


@pytest.mark.parametrize("where, value, field", [
    ({"model_kwargs": ["activation", "gelu"]}, None, "config['model_kwargs']"),
    ({"model_kwargs": "gelu"}, None, "config['model_kwargs']"),
    ({"model_kwargs": None, "model_args": 3}, None, "config['model_args']"),
    ({"model": {"name": "digits_cnn", "kwargs": [["activation", "gelu"]]}}, None, "config['model']['kwargs']"),
    ({"dataset_kwargs": 5}, None, "config['dataset_kwargs']"),
    ({}, {"model": "digits_cnn", "kwargs": "gelu"}, "arch['kwargs']"),
])
def test_checkpoint_kwargs_that_are_not_dicts_name_the_file_and_the_field(tmp_path, capsys, where, value, field):
    """Was a bare TypeError from dict(...) (or a list of pairs quietly taken as a dict)."""
    from jsigr_fast.cli import main

    ckpt = _train_ckpt(_digits_model())
    ckpt["config"].update(where)
    if value is not None:
        ckpt["arch"] = value
    path = tmp_path / "bad.pt"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {str(path)!r}: {field} must be a dict")):
        E.load_checkpoint(str(path))
    # the eval CLI: one line naming the file and the field, exit status 2
    assert main(["eval", str(path), "--limit", "4", "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jsigr-fast eval: error: checkpoint {str(path)!r}: {field} must be a dict"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_load_checkpoint_model_kwargs_argument_must_be_a_mapping(tmp_path):
    torch.save(_train_ckpt(_digits_model()), tmp_path / "ok.pt")
    for bad in (["activation", "gelu"], "gelu", 3):
        with pytest.raises(TypeError, match="model_kwargs must be a mapping of constructor arguments"):
            E.load_checkpoint(str(tmp_path / "ok.pt"), model_kwargs=bad)
    given = {"activation": "gelu"}
    assert E.load_checkpoint(str(tmp_path / "ok.pt"), model_kwargs=given).model_kwargs == given
    assert given == {"activation": "gelu"}  # the caller's mapping is not modified


# ----------------------------------------------------------------------------------------------
# the CLI
# ----------------------------------------------------------------------------------------------
def test_progress_bars_on_request_only(tmp_path, capsys):
    # long evaluations (10k images, PGD-20, several models and seeds) showed nothing until the end
    from jsigr_fast.cli import main

    torch.save(_train_ckpt(_digits_model()), tmp_path / "ok.pt")
    common = ["eval", str(tmp_path / "ok.pt"), "--limit", "12", "--batch-size", "4", "--attack", "clean", "fgsm",
              "pgd:steps=2", "--seeds", "0", "1", "--jacobian-layers", "--n-proj", "2", "--rho-adv",
              "--deepfool-max-iter", "2"]
    assert main([*common, "--progress", "false", "--out", str(tmp_path / "quiet")]) == 0
    assert capsys.readouterr().err == ""
    assert main([*common, "--out", str(tmp_path / "bars")]) == 0
    err = capsys.readouterr().err
    # crafted images: FGSM once + PGD per seed (2), on 12 images; DeepFool over 12; 3 batches x 2 probes
    # (tqdm redraws at most every 0.1 s, so only the totals and labels are sure to show)
    assert "/36 [" in err and "PGD-2 (ε=0.1) on ok, seed 1" in err and "img/s" in err, err
    assert "DeepFool on ok" in err and "/12 [" in err and "Jacobian norms of ok" in err and "/6 [" in err, err
    assert (tmp_path / "quiet" / "accuracy.csv").read_text() == (tmp_path / "bars" / "accuracy.csv").read_text()
    with pytest.raises(SystemExit) as info:
        main([*common, "--progress", "maybe", "--out", str(tmp_path / "x")])
    assert info.value.code == 2
    assert "argument --progress: expected true or false, got 'maybe'" in capsys.readouterr().err
    with pytest.raises(TypeError, match="progress must be a bool"):
        E.robustness_table({"m": _digits_model()}, torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long),
                           ["clean"], progress="yes")


def test_eval_cli_end_to_end(tmp_path, capsys):
    from jsigr_fast.cli import main
    from jsigr_fast.data import Digits

    paths = []
    for seed in (0, 1):
        p = tmp_path / f"net{seed}.pt"
        torch.save(_train_ckpt(_digits_model(seed)), p)
        paths.append(str(p))
    out = tmp_path / "out"
    rc = main(["eval", *paths, "--names", "A,B", "--limit", "24", "--seeds", "0", "1", "--transfer",
               "--attack", "clean", "--attack", "fgsm", "--attack", "pgd:steps=2", "--jacobian-layers",
               "--n-proj", "2", "--rho-adv", "--deepfool-max-iter", "3", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| A |" in text and "Per-layer Jacobian norms" in text and "ρ_adv" in text
    rows = E.read_csv(str(out / "accuracy.csv"))
    assert len(rows) == 3 * 2 + 2 * 2  # 3 attacks x 2 models, FGSM and PGD transfer A->B and B->A
    pgd_rows = [r for r in rows if r.attack.startswith("PGD-2 (ε=0.1)")]
    assert all(len(r.values) == 2 for r in pgd_rows)
    # clean accuracy recomputed by hand from the same images and weights
    ds = Digits("test")
    x = torch.stack([ds[i][0] for i in range(24)])
    y = torch.tensor([ds[i][1] for i in range(24)])
    lm = E.load_checkpoint(paths[0])
    clean = next(r for r in rows if r.source == "A" and r.attack == "clean")
    assert clean.values == (hand_acc(lm.model, x, y),)
    for f in ("results.md", "results.json", "jacobian_layers.csv"):
        assert (out / f).stat().st_size > 0


def test_eval_cli_errors(tmp_path, capsys):
    from jsigr_fast.cli import main

    assert main(["eval", str(tmp_path / "nope.pt"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    torch.save(_digits_model().state_dict(), tmp_path / "bare.pt")
    assert main(["eval", str(tmp_path / "bare.pt"), "--out", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err
    torch.save(_train_ckpt(_digits_model()), tmp_path / "ok.pt")
    assert main(["eval", str(tmp_path / "ok.pt"), "--attack", "pgd:foo=1", "--out", str(tmp_path)]) == 2
    assert "unknown attack option" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="overrides the checkpoint's dataset"):
        assert main(["eval", str(tmp_path / "ok.pt"), "--dataset", "cifar10", "--out", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err


def test_visualize_out_that_is_a_folder_or_under_a_file_is_one_line_and_exit_2(tmp_path, capsys):
    # visualize's --out is the PNG path; a folder used to reach savefig: IsADirectoryError traceback, exit 1.
    from jsigr_fast.cli import main

    torch.save(_train_ckpt(_digits_model()), tmp_path / "ok.pt")
    assert main(["visualize", str(tmp_path / "ok.pt"), "--n-images", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "jsigr-fast visualize: error: --out must be a PNG file path" in err and f"got the folder {tmp_path}" in err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "file").write_text("")
    bad = str(tmp_path / "file" / "s.png")  # a parent that is a file: makedirs fails
    assert main(["visualize", str(tmp_path / "ok.pt"), "--n-images", "1", "--out", bad]) == 2
    err = capsys.readouterr().err
    assert f"--out {bad}: cannot write the PNG" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, fragment", [
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--jacobian-layers", "--n-proj", "0"], "--n-proj must be an integer >= 1, got 0"),
    (["--limit", "0"], "--limit must be an integer >= 1, got 0"),
    (["--jacobian-layers", "--jacobian-limit", "0"], "--jacobian-limit must be an integer >= 1, got 0"),
    (["--rho-adv", "--deepfool-max-iter", "0"], "--deepfool-max-iter must be an integer >= 1, got 0"),
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--eps=-8/255"], "--eps must be a finite number > 0, got -0.0313725"),
    (["--eps", "inf"], "--eps must be a finite number > 0, got inf"),
    (["--seeds", "0", "1", "0"], "--seeds must be distinct, got [0, 1, 0]"),
    (["--device", "cuda"], "--device cuda: CUDA is not available"),
    (["--device", "cuda:1"], "--device cuda:1: CUDA is not available"),
    (["--device", "toaster"], "--device 'toaster' is not a device"),
    (["--attack", "pgd:eps=0.1,restarts=2,random_start=0"],
     "--attack 'pgd:eps=0.1,restarts=2,random_start=0': attack pgd: restarts=2 needs the random start"),
    (["--attack", "fgsm:eps=0.1,restarts=2"],
     "--attack 'fgsm:eps=0.1,restarts=2': attack 'fgsm' takes only eps, got restarts=2"),
    (["--attack", "fgsm:eps=0.1,random_start=0"], "attack 'fgsm' takes only eps, got random_start=0"),
    (["--attack", "fgsm:eps=0.1,alpha=0.05"], "attack 'fgsm' takes only eps, got alpha=0.05"),
    (["--attack", "fgsm:steps=3"], "--attack 'fgsm:steps=3': attack 'fgsm' takes only eps, got steps=3"),
    (["--attack", "mi_fgsm:norm=l2"], "attack 'mi_fgsm' takes only eps, steps, alpha, got norm=l2"),
    (["--attack", "clean:eps=8/255"], "--attack 'clean:eps=8/255': attack 'clean' takes no options, got eps=8/255"),
    (["--out", "{file}"], "--out {file}: cannot create the output folder"),
])
def test_eval_cli_argument_errors_exit_2_and_name_the_argument(tmp_path, capsys, monkeypatch, argv, fragment):
    """Every bad argument is one line on stderr naming it, exit status 2, no traceback, nothing run."""
    from jsigr_fast.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    torch.save(_train_ckpt(_digits_model()), tmp_path / "ok.pt")
    (tmp_path / "file").write_text("not a folder")
    fill = {"file": str(tmp_path / "file")}
    argv = [a.format(**fill) for a in argv]
    assert main(["eval", str(tmp_path / "ok.pt"), "--limit", "4", "--device", "cpu", "--out", str(tmp_path / "o"),
                 *argv]) == 2
    err = capsys.readouterr().err
    assert fragment.format(**fill) in err, err
    assert err.startswith("jsigr-fast eval: error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_eval_cli_unparsable_number_is_an_argparse_error(tmp_path, capsys):
    from jsigr_fast.cli import main

    with pytest.raises(SystemExit) as info:
        main(["eval", str(tmp_path / "ok.pt"), "--eps", "8/zero"])
    assert info.value.code == 2
    assert "argument --eps: not a number: '8/zero' (write e.g. 0.03 or 8/255)" in capsys.readouterr().err


def test_library_attack_and_table_checks():
    with pytest.raises(ValueError, match="restarts=3 needs the random start"):
        E.AttackSpec("pgd", eps=0.1, restarts=3, random_start=False)
    x, y = data()
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        E.robustness_table({"a": Affine(0)}, x, y, ["clean"], batch_size=0)
