"""Audit of ``jsigr-fast visualize`` / ``jsigr-fast demo``: the drawn panels against float64 oracles on odd
inputs (1/3 channels, non-square, batch of 1, train-mode BatchNorm, channels_last, per-model input
normalisation), model state left alone, one-line errors for bad data and flags, and an existing PNG
never destroyed by a failing write."""
from __future__ import annotations

import copy
import errno
import json
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from jsigr_fast import visualize as V


class NormBNNet(nn.Module):
    """Input normalisation inside the model (per-channel mean/std), conv, train-mode-capable BatchNorm."""

    def __init__(self, c, h, w, seed, k=5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(c, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * h * w, k)
        self.register_buffer("mean", torch.rand(c, generator=g).view(1, c, 1, 1))
        self.register_buffer("std", (0.3 + torch.rand(c, generator=g)).view(1, c, 1, 1))

    def forward(self, x):
        return self.fc(F.gelu(self.bn(self.conv((x - self.mean) / self.std))).flatten(1))


def _oracle(model, x, y, *, eps, seed, beta=None, quantile=None):
    """|grad_x CE| at x and the perturbation saliency / mask, from saliency.py's documented formulas, in float64:
    g_hat = grad CE at x + eps*std(x)*z, z ~ N(0, 1) from a CPU generator seeded with ``seed``;
    M = |g_hat| / max |g_hat| per sample; mask = 1[M <= beta], or the top floor(q D) features kept."""
    def grad_at(xi):
        m = copy.deepcopy(model).double()  # a copy: train-mode BN may update its own running stats
        xi = xi.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(m(xi), y, reduction="sum"), xi)
        return g

    xd = x.double().contiguous()
    g = grad_at(xd)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).double()
    g_hat = grad_at(xd + eps * xd.std(unbiased=False) * z)
    a = g_hat.abs()
    M = a / a.flatten(1).amax(1).view(-1, 1, 1, 1)
    if quantile is None:
        mask = (M <= beta).double()
    else:
        d = M[0].numel()
        kept = max(k for k in range(d + 1) if k / d <= quantile)
        mask = torch.ones_like(M).flatten(1)
        mask.scatter_(1, M.flatten(1).argsort(1, descending=True)[:, :kept], 0.0)
        mask = mask.view_as(M)
    return g, M, mask


@pytest.mark.parametrize("c, h, w, n, train, channels_last, quantile", [
    (1, 6, 6, 3, False, False, None),
    (3, 5, 7, 2, False, False, None),   # non-square RGB
    (3, 5, 7, 1, False, False, 0.1),    # batch of 1, quantile rule
    (1, 4, 9, 1, False, False, None),   # non-square grey, batch of 1
    (3, 6, 6, 4, True, False, None),    # train-mode BatchNorm
    (3, 6, 6, 4, True, True, 0.25),     # ... and channels_last
])
def test_drawn_panels_match_float64_oracle_and_leave_models_alone(c, h, w, n, train, channels_last, quantile):
    torch.manual_seed(100 * c + h + w + n)
    models = {"a": NormBNNet(c, h, w, seed=1).train(train), "b": NormBNNet(c, h, w, seed=2).train(train)}
    x, y = torch.rand(n, c, h, w), torch.randint(0, 5, (n,))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        models = {k: m.to(memory_format=torch.channels_last) for k, m in models.items()}
    x0 = x.clone()
    states = {k: copy.deepcopy(m.state_dict()) for k, m in models.items()}
    modes = {k: [s.training for s in m.modules()] for k, m in models.items()}
    panels = V.saliency_panels(models, x, y, eps=0.3, beta=0.2, quantile=quantile, seed=5)
    fig, axes = V.build_saliency_figure(panels)
    for r, (name, model) in enumerate(models.items()):
        # BN running stats / num_batches_tracked untouched, modes kept, no .grad left on parameters
        assert all(torch.equal(states[name][k], v) for k, v in model.state_dict().items()), name
        assert [s.training for s in model.modules()] == modes[name]
        assert all(p.grad is None for p in model.parameters())
        g, M, mask = _oracle(model, x0, y, eps=0.3, seed=5, beta=0.2, quantile=quantile)
        want = {"input": x0[:, 0] if c == 1 else x0.permute(0, 2, 3, 1), "gradient": g.abs().mean(1),
                "saliency": M.mean(1), "mask": mask.mean(1)}
        scale = {"input": 1.0, "gradient": float(g.abs().max()), "saliency": 1.0, "mask": 1.0}
        for i in range(n):
            for j, kind in enumerate(V.PANELS):
                shown = torch.from_numpy(axes[r][i * 4 + j].get_images()[0].get_array().data).double()
                err = float((shown - want[kind][i].double()).abs().max()) / scale[kind]
                assert err < 1e-5, (name, i, kind, err)
    assert torch.equal(x, x0)


# ----------------------------------------------------------------------------------------------
# nothing lost: the PNG is written atomically
# ----------------------------------------------------------------------------------------------
def _ckpt(path, *, seed=0, **config):
    from jsigr_fast.models import get_model

    torch.manual_seed(seed)
    torch.save({"model": get_model("digits_cnn").state_dict(),
                "config": {"model": "digits_cnn", "dataset": "digits", **config}}, path)
    return str(path)


def _full_disk_png(im, fp, filename, *args, **kwargs):  # PIL's PNG writer on a full disk: half a file, then
    fp.write(b"\x89PNG\r\n\x1a\nhalf")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_write_keeps_the_existing_png(tmp_path, capsys, monkeypatch):
    import PIL.Image

    from jsigr_fast.cli import main

    ck = _ckpt(tmp_path / "m.pt")
    out = tmp_path / "fig.png"
    assert main(["visualize", ck, "--n-images", "1", "--out", str(out)]) == 0
    good = out.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not a private temp file's 0600
    capsys.readouterr()
    monkeypatch.setitem(PIL.Image.SAVE, "PNG", _full_disk_png)
    assert main(["visualize", ck, "--n-images", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jsigr-fast visualize: error: --out") and "No space left" in err, err
    assert out.read_bytes() == good  # not truncated, not half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "m.pt"]  # no temporary file left


def test_interrupted_write_keeps_the_existing_png(tmp_path, monkeypatch):
    import PIL.Image

    models = {"m": NormBNNet(1, 6, 6, seed=0).eval()}
    x, y = torch.rand(2, 1, 6, 6), torch.tensor([0, 1])
    out = tmp_path / "fig.png"
    out.write_bytes(b"the user's earlier figure")

    def interrupted(im, fp, filename, *args, **kwargs):
        fp.write(b"\x89PNG")
        raise KeyboardInterrupt

    # PIL registers its PNG writer when the plugin is first imported: import it now, or that would undo the
    # patch below when this test runs first (alone)
    PIL.Image.preinit()
    monkeypatch.setitem(PIL.Image.SAVE, "PNG", interrupted)
    with pytest.raises(KeyboardInterrupt):
        V.saliency_figure(models, x, y, path=str(out))
    assert out.read_bytes() == b"the user's earlier figure"
    assert [p.name for p in tmp_path.iterdir()] == ["fig.png"]


# ----------------------------------------------------------------------------------------------
# bad input: one line naming what is wrong, nothing written
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("data_kwargs, fragment", [
    ({"shape": [1, 16, 16], "num_classes": 10}, "model 'syn' cannot take the data's images of shape (1, 16, 16)"),
    ({"shape": [3, 8, 8], "num_classes": 10}, "model 'syn' cannot take the data's images of shape (3, 8, 8)"),
    ({"shape": [1, 8, 8], "num_classes": 30}, "model 'syn' has 10 outputs but the data has labels up to"),
    ({"shape": [2, 8, 8], "num_classes": 10}, "dataset 'synthetic' gives images of shape (2, 8, 8)"),
])
def test_cli_model_data_mismatch_is_a_one_line_error(tmp_path, capsys, data_kwargs, fragment):
    from jsigr_fast.cli import main

    ck = _ckpt(tmp_path / "syn.pt", dataset="synthetic", dataset_kwargs={"shape": [1, 8, 8], "num_classes": 10})
    out = tmp_path / "fig.png"
    assert main(["visualize", ck, "--dataset-kwargs", json.dumps(data_kwargs), "--n-images", "8",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jsigr-fast visualize: error: ") and len(err.strip().splitlines()) == 1, err
    assert fragment in err, err
    assert not out.exists()


@pytest.mark.parametrize("kwargs, fragment", [
    ({"quantile": 1.5}, "quantile for 'm' must be a number in [0, 1]"),
    ({"quantile": {"m": -0.1}}, "quantile for 'm' must be a number in [0, 1]"),
    ({"quantile": float("nan")}, "quantile for 'm' must be a number in [0, 1]"),
    ({"beta": float("nan")}, "beta for 'm' must be a finite number"),
    ({"eps": -0.3}, "eps must be a finite number >= 0"),
])
def test_python_api_refuses_bad_mask_arguments(kwargs, fragment):
    # before: quantile 1.5 / -0.1 gave an all-0 / all-1 mask, eps < 0 silently meant no perturbation
    models = {"m": NormBNNet(1, 6, 6, seed=0).eval()}
    x, y = torch.rand(2, 1, 6, 6), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=None) as info:
        V.saliency_panels(models, x, y, **kwargs)
    assert fragment in str(info.value)


# ----------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, fragment", [
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--batch", "0"], "--batch must be an integer >= 1, got 0"),
    (["--attack-steps", "0"], "--attack-steps must be an integer >= 1, got 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--eps=-1"], "--eps must be a finite number >= 0, got -1"),
    (["--attack-eps=-0.1"], "--attack-eps must be a finite number >= 0, got -0.1"),
    (["--lambda-m", "inf"], "--lambda-m must be a finite number >= 0, got inf"),
    (["--out", "{file}"], "--out must be a folder (created if missing), got the file {file}"),
])
def test_demo_flag_errors_before_training(tmp_path, capsys, monkeypatch, argv, fragment):
    from jsigr_fast import demo
    from jsigr_fast.cli import main

    def no_training(*a, **k):
        raise AssertionError("trained despite a bad flag")

    monkeypatch.setattr(demo, "train_one", no_training)
    afile = tmp_path / "afile"
    afile.write_text("keep")
    argv = [a.format(file=afile) for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "demo")]
    assert main(["demo", *out, *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jsigr-fast demo: error: ") and len(err.strip().splitlines()) == 1, err
    assert fragment.format(file=afile) in err, err
    assert afile.read_text() == "keep" and not (tmp_path / "demo").exists()


def _fast_demo(monkeypatch):
    """The demo with training replaced by two fixed, untrained digits CNNs (what is audited is the
    evaluation, the report and the files, not the optimiser)."""
    from jsigr_fast import demo
    from jsigr_fast.models import get_model

    def fixed(method, *a, **k):
        torch.manual_seed({"standard": 0, "jsigr": 1}[method])
        return get_model("digits_cnn", activation=k.get("activation", "gelu")).eval(), 0.0

    monkeypatch.setattr(demo, "train_one", fixed)


def test_demo_without_matplotlib_still_reports(tmp_path, capsys, monkeypatch):
    from jsigr_fast.cli import main

    _fast_demo(monkeypatch)
    for name in [k for k in sys.modules if k == "matplotlib" or k.startswith("matplotlib.")] + [
            "matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if matplotlib were not installed
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--attack-steps", "1", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "| standard |" in captured.out and "wrote results.md, results.json, standard.pt, jsigr.pt to" in captured.out
    assert "saliency.png not drawn: matplotlib is not installed" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["jsigr.pt", "results.json", "results.md", "standard.pt"]


def test_demo_reports_the_accuracies_it_measures(tmp_path, capsys, monkeypatch):
    """Clean and FGSM accuracy recomputed from the written checkpoints in float64, PGD by a plain
    loop with the demo's random start (uniform in the eps-cube from a generator seeded with --seed)."""
    from jsigr_fast.cli import main
    from jsigr_fast.data import Digits
    from jsigr_fast.evaluate import load_checkpoint

    _fast_demo(monkeypatch)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--attack-steps", "2", "--attack-eps", "0.1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert (out / "saliency.png").stat().st_size > 0
    results = json.loads((out / "results.json").read_text())["results"]
    ds = Digits("test", seed=0)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    eps, steps = 0.1, 2
    for method in ("standard", "jsigr"):
        net = load_checkpoint(str(out / f"{method}.pt")).model
        net64, x64 = copy.deepcopy(net).double(), x.double()
        xr = x64.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(net64(xr), y, reduction="sum"), xr)
        with torch.no_grad():
            clean = float((net64(x64).argmax(1) == y).double().mean())
            fgsm = float((net64((x64 + eps * g.sign()).clamp(0, 1)).argmax(1) == y).double().mean())
        gen = torch.Generator().manual_seed(0)
        xa = (x + (2 * torch.rand(x.shape, generator=gen) - 1) * eps).clamp(0, 1)
        for _ in range(steps):
            xr = xa.clone().requires_grad_(True)
            (ga,) = torch.autograd.grad(F.cross_entropy(net(xr), y, reduction="sum"), xr)
            xa = (x + (xa + 2.5 * eps / steps * ga.sign() - x).clamp(-eps, eps)).clamp(0, 1).detach()
        with torch.no_grad():
            pgd = float((net(xa).argmax(1) == y).float().mean())
        r = results[method]
        n = len(y)
        assert abs(r["clean"] - clean) < 0.5 / n and abs(r["fgsm"] - fgsm) <= 1.5 / n and abs(r["pgd"] - pgd) <= 1.5 / n
        assert f"| {method} | {r['clean']:.3f} | {r['fgsm']:.3f} | {r['pgd']:.3f} |" in text
        assert f"| {method} | {r['clean']:.3f} |" in (out / "results.md").read_text()


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_demo_interrupted_report_write_keeps_the_previous_results(tmp_path, capsys, monkeypatch, exc):
    # results.md / results.json were written with a plain open(..., "w"): a failure or Ctrl-C midway
    # (disk full) truncated the previous report and left half a JSON document behind.
    from jsigr_fast import demo
    from jsigr_fast.cli import main

    _fast_demo(monkeypatch)
    monkeypatch.setattr(V, "saliency_figure", lambda *a, **k: pytest.fail("drew after a failed report write"))
    out = tmp_path / "demo"
    out.mkdir()
    previous = '{"results": {"standard": {"clean": 0.5}}}\n'
    (out / "results.json").write_text(previous)
    def fail(obj, **kw):  # the report is serialised inside the write, once its file is open
        raise exc

    monkeypatch.setattr(demo.json, "dumps", fail)
    with pytest.raises(type(exc)):
        main(["demo", "--out", str(out), "--attack-steps", "1", "--no-progress"])
    capsys.readouterr()
    assert (out / "results.json").read_text() == previous
    # results.md, written before, is complete; nothing else (no temporary file) is left in the folder
    assert (out / "results.md").read_text().rstrip("\n").endswith("|")
    assert "| standard |" in (out / "results.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["jsigr.pt", "results.json", "results.md", "standard.pt"]


# ----------------------------------------------------------------------------------------------
# the figure's format follows the extension of --out / path
# ----------------------------------------------------------------------------------------------
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _tiny_models_and_batch():
    return {"m": NormBNNet(1, 6, 6, seed=0).eval()}, torch.rand(2, 1, 6, 6), torch.tensor([0, 1])


def _looks_like(data: bytes, kind: str) -> bool:
    """File signatures from the formats' own specifications, not from matplotlib."""
    if kind == "png":
        return data.startswith(_PNG_SIGNATURE)
    if kind == "pdf":
        return data.startswith(b"%PDF-") and b"%%EOF" in data[-32:]
    if kind == "svg":
        return b"<svg" in data and data.rstrip().endswith(b"</svg>")
    if kind == "jpeg":
        return data.startswith(b"\xff\xd8\xff") and data.rstrip(b"\x00").endswith(b"\xff\xd9")
    raise AssertionError(kind)


@pytest.mark.parametrize("name, kind", [
    ("fig.png", "png"), ("fig.pdf", "pdf"), ("fig.svg", "svg"), ("fig.PDF", "pdf"), ("fig.jpg", "jpeg"),
    ("fig", "png"),  # no extension: PNG, as before
])
def test_saliency_figure_format_follows_the_extension(tmp_path, name, kind):
    # savefig was always called with format="png": fig.pdf / fig.svg / fig.jpg held PNG bytes
    models, x, y = _tiny_models_and_batch()
    path = str(tmp_path / name)
    assert V.saliency_figure(models, x, y, path=path) == path
    data = (tmp_path / name).read_bytes()
    assert _looks_like(data, kind), data[:16]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # written atomically: no temporary file left


def test_saliency_figure_unknown_extension_is_refused_before_any_gradient(tmp_path, monkeypatch):
    models, x, y = _tiny_models_and_batch()
    monkeypatch.setattr(V, "saliency_panels", lambda *a, **k: pytest.fail("computed the panels"))
    out = tmp_path / "fig.xyz"
    with pytest.raises(ValueError) as e:
        V.saliency_figure(models, x, y, path=str(out))
    msg = str(e.value)
    assert msg.startswith(f"path {out}: ") and ".xyz" in msg, msg
    assert all(ext in msg for ext in (".png", ".pdf", ".svg")), msg
    assert list(tmp_path.iterdir()) == []


def test_saliency_figure_pgf_without_latex_is_refused_before_any_gradient(tmp_path, monkeypatch):
    # matplotlib lists .pgf, but its backend needs LaTeX: savefig failed only after the whole figure was drawn
    import shutil

    models, x, y = _tiny_models_and_batch()
    monkeypatch.setattr(V, "saliency_panels", lambda *a, **k: pytest.fail("computed the panels"))
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(ValueError, match=r"^path .*fig\.pgf: writing \.pgf needs \w*latex"):
        V.saliency_figure(models, x, y, path=str(tmp_path / "fig.pgf"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, kind", [("fig.pdf", "pdf"), ("fig.svg", "svg"), ("fig.png", "png")])
def test_cli_out_extension_picks_the_format(tmp_path, capsys, name, kind):
    from jsigr_fast.cli import main

    ck = _ckpt(tmp_path / "m.pt")
    out = tmp_path / "figs" / name
    assert main(["visualize", ck, "--n-images", "1", "--out", str(out)]) == 0
    assert _looks_like(out.read_bytes(), kind), out.read_bytes()[:16]
    assert f"wrote {out}" in capsys.readouterr().out


def test_cli_out_with_an_extension_matplotlib_cannot_write_is_refused_before_loading(tmp_path, capsys,
                                                                                         monkeypatch):
    import jsigr_fast.evaluate as E
    from jsigr_fast.cli import main

    ck = _ckpt(tmp_path / "m.pt")
    monkeypatch.setattr(E, "load_models", lambda *a, **k: pytest.fail("loaded the models before checking --out"))
    out = tmp_path / "fig.xyz"
    assert main(["visualize", ck, "--n-images", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jsigr-fast visualize: error: --out {out}: ") and len(err.strip().splitlines()) == 1, err
    assert ".xyz" in err and all(ext in err for ext in (".png", ".pdf", ".svg")), err
    assert not out.exists()
