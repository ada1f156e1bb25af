"""Tests for jsigr_fast.visualize: the panels are the library's quantities (checked against plain
autograd too), the drawn arrays are the documented reductions of them, and the PNG has the
layout's pixel size."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jsigr_fast
from jsigr_fast import visualize as V


class Tiny(nn.Module):
    def __init__(self, c, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(c, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(F.gelu(self.conv(x)).flatten(1))


def batch(c, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def hand_input_gradient(model, x, y):
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    return g


@pytest.mark.parametrize("c", [1, 3])
def test_panels_are_the_library_quantities(c):
    models = {"a": Tiny(c, 0).eval(), "b": Tiny(c, 1).eval()}
    x, y = batch(c)
    panels = V.saliency_panels(models, x, y, eps=0.3, beta=0.2, seed=7)
    assert list(panels) == ["a", "b"]
    for name, m in models.items():
        p = panels[name]
        assert torch.equal(p["input"], x)
        assert torch.allclose(p["gradient"], hand_input_gradient(m, x, y), atol=1e-6)
        g_hat = jsigr_fast.perturbed_input_gradient(m, x, y, eps=0.3, generator=torch.Generator().manual_seed(7))
        assert torch.equal(p["perturbed_gradient"], g_hat)
        assert not torch.equal(g_hat, p["gradient"])  # the perturbation did something
        M = jsigr_fast.gradient_saliency(g_hat)
        assert torch.equal(p["saliency"], M)
        assert torch.equal(p["mask"], (M <= 0.2).float())  # = jsigr_fast.selective_mask(M, beta=0.2)
        assert torch.equal(p["mask"], jsigr_fast.selective_mask(M, beta=0.2))
        d = V.display_arrays(p)
        assert d["input"].shape == ((3, 6, 6) if c == 1 else (3, 6, 6, 3))
        if c == 3:
            assert (d["input"] == x.permute(0, 2, 3, 1).numpy()).all()
        assert torch.allclose(torch.from_numpy(d["gradient"]), p["gradient"].abs().mean(1))
        assert torch.allclose(torch.from_numpy(d["saliency"]), M.mean(1))
        assert torch.allclose(torch.from_numpy(d["mask"]), (M <= 0.2).float().mean(1))
    # the same noise for every model: a model's saliency does not depend on which others are drawn
    alone = V.saliency_panels({"b": models["b"]}, x, y, eps=0.3, beta=0.2, seed=7)
    assert torch.equal(alone["b"]["saliency"], panels["b"]["saliency"])


def test_quantile_and_trained_adaptor():
    models = {"m": Tiny(1, 0).eval()}
    x, y = batch(1, n=2)
    q = V.saliency_panels(models, x, y, quantile=0.25)["m"]
    assert q["mask"].flatten(1).sum(1).tolist() == [36 - 9, 36 - 9]  # top 25 % of 36 features kept
    crit = jsigr_fast.JSIGR((1, 6, 6), discriminator="mnist", beta=0.05)
    with torch.no_grad():
        crit.adaptor.conv.weight.fill_(2.0)
    p = V.saliency_panels(models, x, y, beta=None, saliency=crit, seed=3)["m"]
    with torch.no_grad():
        M = crit.adaptor(p["perturbed_gradient"])
    assert torch.equal(p["saliency"], M) and float(p["beta"]) == 0.05
    assert torch.equal(p["mask"], (M <= 0.05).float())
    p = V.saliency_panels(models, x, y, beta=None, saliency={"m": crit.adaptor})["m"]
    assert float(p["beta"]) == 0.0  # a bare adaptor: tanh midpoint
    with pytest.raises(TypeError):
        V.saliency_panels(models, x, y, saliency=42)
    with pytest.raises(ValueError, match="1- or 3-channel"):
        V.saliency_panels(models, torch.rand(2, 2, 6, 6), y)


def test_per_model_quantile_and_its_row_label(tmp_path):
    models = {"q": Tiny(1, 0).eval(), "b": Tiny(1, 1).eval()}
    x, y = batch(1, n=2)
    panels = V.saliency_panels(models, x, y, beta={"q": None, "b": 0.2}, quantile={"q": 0.25, "b": None})
    assert panels["q"]["quantile"] == 0.25 and panels["b"]["quantile"] is None
    assert panels["q"]["mask"].flatten(1).sum(1).tolist() == [36 - 9, 36 - 9]
    assert torch.equal(panels["b"]["mask"], (panels["b"]["saliency"] <= 0.2).float())
    fig, _ = V.build_saliency_figure(panels)
    texts = [t.get_text() for t in fig.texts]
    assert any(t.startswith("q\ntop 0.25 kept") for t in texts) and any(t.startswith("b\nβ=0.2") for t in texts)
    path = V.saliency_figure(models, x, y, path=str(tmp_path / "f.png"), beta={"q": None, "b": 0.2},
                             quantile={"q": 0.25, "b": None})
    assert (tmp_path / "f.png").stat().st_size > 0 and path.endswith("f.png")


def test_saliency_figure_png_size_grid_and_panel_data(tmp_path):
    import matplotlib.image as mpimg

    models = {"standard": Tiny(3, 0).eval(), "jsigr": Tiny(3, 1).eval(), "pgd_at": Tiny(3, 2).eval()}
    x, y = batch(3, n=2)
    path = str(tmp_path / "sub" / "grid.png")
    # exactly the demo's call
    assert V.saliency_figure(models, x, y, path=path, eps=0.3) == path
    img = mpimg.imread(path)
    lay = V.figure_layout(3, 2)
    assert (lay["nrows"], lay["ncols"]) == (3, 8)
    assert img.shape[:2] == lay["pixels"] == (int(round((0.5 + 3 * 1.2) * 100)), int(round((1.4 + 8 * 1.2) * 100)))
    assert img[..., :3].std() > 0.05  # not blank

    panels = V.saliency_panels(models, x, y, eps=0.3, beta=0.1)
    fig, axes = V.build_saliency_figure(panels)
    assert len(axes) == 3 and all(len(r) == 8 for r in axes) and len(fig.axes) == 24
    for r, name in enumerate(models):
        d = V.display_arrays(panels[name])
        for i in range(2):
            for j, kind in enumerate(V.PANELS):
                shown = axes[r][i * 4 + j].get_images()[0].get_array()
                assert (shown == d[kind][i]).all(), (name, i, kind)


def test_visualize_cli(tmp_path, capsys):
    import matplotlib.image as mpimg

    from jsigr_fast.cli import main
    from jsigr_fast.models import get_model

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = get_model("digits_cnn")
        paths.append(str(tmp_path / f"m{seed}.pt"))
        torch.save({"model": m.state_dict(), "config": {"model": "digits_cnn", "dataset": "digits"}}, paths[-1])
    out = str(tmp_path / "fig.png")
    assert main(["visualize", *paths, "--n-images", "3", "--out", out]) == 0
    assert mpimg.imread(out).shape[:2] == V.figure_layout(2, 3)["pixels"]
    assert "2 models x 3 images" in capsys.readouterr().out
    assert main(["visualize", paths[0], "--saliency", "adaptor", "--out", out]) == 2
    assert "no trained saliency adaptor" in capsys.readouterr().err
    assert main(["visualize", str(tmp_path / "missing.pt"), "--out", out]) == 2


def _run_ckpt(path, *, seed=0, adaptor=True, **config):
    """A checkpoint as jsigr-fast train writes it, as far as visualize reads it: weights, the run's
    config, and (for J-SIGR) the criterion's adaptor."""
    from jsigr_fast.models import get_model

    torch.manual_seed(seed)
    ckpt = {"model": get_model("digits_cnn").state_dict(),
            "config": {"model": "digits_cnn", "dataset": "digits", **config}}
    if adaptor:
        crit = jsigr_fast.JSIGR((1, 8, 8), discriminator="mnist")
        ckpt["method"] = {"criterion": crit.state_dict()}
    torch.save(ckpt, path)
    return str(path)


def test_visualize_cli_takes_the_mask_rule_from_the_run(tmp_path, capsys, monkeypatch):
    from jsigr_fast.cli import main

    drawn = {}

    def fake_figure(models, x, y, *, path, beta, quantile, saliency, **kw):  # what would be drawn
        drawn.update(beta=beta, quantile=quantile, saliency=saliency)
        return path

    monkeypatch.setattr(V, "saliency_figure", fake_figure)
    beta_run = _run_ckpt(tmp_path / "b.pt", method="jsigr", beta=0.3, mask_quantile=None)
    q_run = _run_ckpt(tmp_path / "q.pt", seed=1, method="jsigr", beta=0.0, mask_quantile=0.2)
    std_run = _run_ckpt(tmp_path / "s.pt", seed=2, adaptor=False, method="standard", beta=0.0, mask_quantile=None)
    out = str(tmp_path / "fig.png")
    assert main(["visualize", beta_run, q_run, std_run, "--names", "b,q,s", "--n-images", "1", "--out", out]) == 0
    assert drawn["beta"] == {"b": 0.3, "q": None, "s": 0.1} and drawn["quantile"] == {"b": None, "q": 0.2, "s": None}
    text = capsys.readouterr().out
    assert "b: the run's adaptor saliency, mask 1[M ≤ β] at β=0.3 (the run's beta)" in text
    assert "q: the run's adaptor saliency, mask leaves the top 0.2 unpenalised (the run's mask_quantile)" in text
    assert "s: gradient saliency, mask 1[M ≤ β] at β=0.1 (default for gradient saliency)" in text
    # explicit flags override the run; the run's beta is on its adaptor's tanh scale, so gradient saliency
    # keeps its own default, while a quantile (scale-free) still applies
    assert main(["visualize", beta_run, q_run, "--names", "b,q", "--n-images", "1", "--beta", "0.5", "--out", out]) == 0
    assert drawn["beta"] == {"b": 0.5, "q": 0.5} and drawn["quantile"] == {"b": None, "q": None}
    assert main(["visualize", beta_run, q_run, "--names", "b,q", "--n-images", "1", "--quantile", "0.1",
                 "--out", out]) == 0
    assert drawn["quantile"] == {"b": 0.1, "q": 0.1}
    assert main(["visualize", beta_run, q_run, "--names", "b,q", "--n-images", "1", "--saliency", "gradient",
                 "--out", out]) == 0
    assert drawn["beta"] == {"b": 0.1, "q": None} and drawn["quantile"] == {"b": None, "q": 0.2}
    assert main(["visualize", beta_run, "--n-images", "1", "--beta=-0.5", "--out", out]) == 0  # tanh: in range
    assert drawn["beta"] == {"b": -0.5}


@pytest.mark.parametrize("argv, fragment", [
    (["--quantile", "1.5"], "--quantile must be a number in [0, 1], got 1.5"),
    (["--quantile=-0.1"], "--quantile must be a number in [0, 1], got -0.1"),
    (["--beta", "2"], "--beta must be a number in [-1, 1] (the saliency's range), got 2"),
    (["--beta", "nan"], "--beta must be a number in [-1, 1]"),
    (["--beta=-0.2", "--saliency", "gradient"],
     "--beta -0.2 penalises nothing: gradient saliency M is in [0, 1] (model 'b')"),
    (["--beta", "0.2", "--quantile", "0.5"], "give --beta or --quantile, not both"),
    (["--n-images", "0"], "--n-images must be an integer >= 1, got 0"),
    (["--eps=-1"], "--eps must be a finite number >= 0, got -1"),
    (["--device", "cuda"], "--device cuda: CUDA is not available"),
    (["{bad_q}"], "checkpoint {bad_q}: the run's config key 'mask_quantile' must be a number in [0, 1] or null, "
                  "got 3"),
    (["{bad_b}"], "checkpoint {bad_b}: the run's config key 'beta' must be a number in [-1, 1], got 'high'"),
])
def test_visualize_cli_argument_errors(tmp_path, capsys, monkeypatch, argv, fragment):
    from jsigr_fast.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fill = {"bad_q": _run_ckpt(tmp_path / "bad_q.pt", method="jsigr", beta=0.0, mask_quantile=3),
            "bad_b": _run_ckpt(tmp_path / "bad_b.pt", method="jsigr", beta="high", mask_quantile=None)}
    ckpts = [a.format(**fill) for a in argv if a.startswith("{")] or [_run_ckpt(tmp_path / "b.pt", method="jsigr")]
    flags = [a for a in argv if not a.startswith("{")]
    out = tmp_path / "fig.png"
    assert main(["visualize", *ckpts, "--names", ",".join("b" * len(ckpts)), "--n-images", "1", "--device", "cpu",
                 *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert fragment.format(**fill) in err, err
    assert err.startswith("jsigr-fast visualize: error: ") and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
