"""Every training method trains from the CLI on the embedded digits data, and computes what its
documentation says (checked against independent computations)."""
import csv
import math
import os

import pytest
import torch
import torch.nn.functional as F

from jsigr_fast.cli import main

QUIET = ["--threads", "1", "--progress", "false", "--tensorboard", "false"]
# 2 epochs x 2 steps of 16 images, a row of steps.csv per step, one evaluation batch.
BASE = ["--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "16", "--eval-max-batches", "1", "--log-every", "1",
        "--optimizer", "sgd", "--lr", "0.05", "--model-arg", "activation=gelu"]


def train_cli(out, *args):
    assert main(["train", *BASE, *QUIET, "--out", str(out), *args]) == 0
    return torch.load(out / "last.pt", weights_only=True)


def rows(out):
    with open(out / "steps.csv", newline="") as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def initial_weights():
    from jsigr_fast.models import get_model

    torch.manual_seed(0)  # the trainer seeds the model's init with --seed (0)
    return get_model("digits_cnn", dataset="digits", activation="gelu").state_dict()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A (briefly) trained standard model: the teacher of ir and distill."""
    out = tmp_path_factory.mktemp("teacher")
    return out / "last.pt", train_cli(out, "--method", "standard")


def approx(v):
    return pytest.approx(v, rel=2e-5, abs=2e-5)  # CSV values carry 6 significant digits


# (method, extra flags, identity every logged step must satisfy)
CASES = [
    ("standard", [], lambda r: r["loss"] == approx(r["ce"])),
    ("jsigr", [],
     lambda r: r["loss"] == approx(r["ce"] + 0.5 * r["sig"] + 0.5 * r["jac"]) and 0 < r["mask_fraction"] < 1),
    ("jacobian", [], lambda r: r["loss"] == approx(r["ce"] + 0.1 * r["jac"]) and r["jac"] > 0),
    ("jacobian", ["--jacobian-squared", "false", "--jacobian-estimator", "exact"],
     lambda r: r["loss"] == approx(r["ce"] + 0.1 * r["jac"]) and r["jac"] > 0),
    ("input_grad", ["--lambda-ig", "2"], lambda r: r["loss"] == approx(r["ce"] + 2 * r["ig"]) and r["ig"] > 0),
    ("jsigr", ["--mode", "fd"],
     lambda r: r["loss"] == approx(r["ce"] + 0.5 * r["sig"] + 0.5 * r["jac"]) and 0 < r["mask_fraction"] < 1),
    ("jacobian", ["--mode", "fd"], lambda r: r["loss"] == approx(r["ce"] + 0.1 * r["jac"]) and r["jac"] > 0),
    ("input_grad", ["--mode", "fd", "--lambda-ig", "2"],
     lambda r: r["loss"] == approx(r["ce"] + 2 * r["ig"]) and r["ig"] > 0),
    ("pgd_at", ["--attack-steps", "3"], lambda r: r["loss"] == approx(r["ce"])),
    ("fgsm_at", [], lambda r: r["loss"] == approx(r["ce"])),
    ("fgsm_at", ["--fgsm-variant", "clean_adv"],
     lambda r: r["ce"] == approx((r["ce_clean"] + r["ce_adv"]) / 2) and r["ce_adv"] != r["ce_clean"]),
    ("distill", ["--temperature", "50"],  # stage 1 at T = 50: softmax(z / 50) is nearly uniform, CE ~ log 10
     lambda r: r["loss"] == approx(r["soft_ce"]) and abs(r["loss"] - math.log(10)) < 0.05),
]


@pytest.mark.parametrize("method, extra, identity", CASES,
                         ids=[f"{c[0]}{'-' + c[1][1] if c[1] else ''}" for c in CASES])
def test_method_trains_from_the_cli(tmp_path, method, extra, identity):
    ckpt = train_cli(tmp_path, "--method", method, *extra)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["global_step"]) == (2, 0, 4)
    assert ckpt["config"]["method"] == method
    logged = rows(tmp_path)
    assert [r["global_step"] for r in logged] == [1, 2, 3, 4]
    for r in logged:
        assert math.isfinite(r["loss"]) and identity(r), r
    init = initial_weights()
    changed = [k for k, v in ckpt["model"].items() if not torch.equal(v, init[k])]
    assert "fc.weight" in changed and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert 0 <= ckpt["metrics"]["eval_clean"] <= 1


@pytest.mark.parametrize("method, term", [("jsigr", "sig"), ("jsigr", "jac"), ("jacobian", "jac"),
                                          ("input_grad", "ig")])
def test_fd_mode_reaches_the_penalty(tmp_path, method, term):
    # The first logged step sees the same weights and batch in both runs: the finite-difference
    # penalty is the exact one up to its O(fd_step) bias, and not bit-equal to it.
    first = {}
    for mode in ("autograd", "fd"):
        train_cli(tmp_path / mode, "--method", method, "--mode", mode, "--epochs", "1", "--steps-per-epoch", "1")
        first[mode] = rows(tmp_path / mode)[0]
    exact, fd = first["autograd"][term], first["fd"][term]
    assert fd != exact and abs(fd / exact - 1) < 0.01, (exact, fd)  # ~1e-3 at fd_step 0.01
    assert first["fd"]["ce"] == first["autograd"]["ce"]


@pytest.mark.parametrize("method", ["jarn", "jarn_at1"])
def test_jarn_runs_on_the_last_part_of_training_only(tmp_path, method):
    ckpt = train_cli(tmp_path, "--method", method, "--jarn-start", "0.5")  # 4 steps: CE for 2, then JARN for 2
    logged = rows(tmp_path)
    assert ["gen" in r for r in logged] == [False, False, True, True]
    for r in logged[2:]:
        assert r["loss"] == approx(r["ce"] + 1.0 * r["gen"]), r
    gan = ckpt["method"]["criterion"]["gan._extra_state"]
    assert gan["steps"] == 2  # the adaptor was stepped only while JARN was on
    assert len(gan["adaptor_opt"]["state"]) > 0 and len(gan["disc_opt"]["state"]) > 0  # optimizer state travels


def test_jsigr_checkpoint_holds_the_adaptor_and_discriminator(tmp_path):
    ckpt = train_cli(tmp_path, "--method", "jsigr", "--disc-every", "3")
    crit = ckpt["method"]["criterion"]
    assert crit["gan._extra_state"]["steps"] == 4
    assert any(k.startswith("gan.adaptor.") for k in crit) and any(k.startswith("gan.discriminator.") for k in crit)
    assert crit["gan._extra_state"]["disc_opt"]["state"][0]["step"] == 2  # discriminator steps at 1 and 4 (every 3)


def test_ir_uses_the_teacher_and_stores_it(tmp_path, teacher, capsys):
    path, tckpt = teacher
    ckpt = train_cli(tmp_path / "online", "--method", "ir", "--teacher", str(path), "--ir-samples", "4")
    for r in rows(tmp_path / "online"):
        assert r["loss"] == approx(r["ce"] - 3.0 * r["cos"] + 0.15 * r["mag"]) and -1 <= r["cos"] <= 1, r
    stored = ckpt["method"]
    assert stored["teacher_arch"] == tckpt["arch"]
    assert all(torch.equal(stored["teacher"][k], v) for k, v in tckpt["model"].items())
    train_cli(tmp_path / "pre", "--method", "ir", "--teacher", str(path), "--ir-targets", "precompute",
              "--ir-samples", "2")
    assert "ir: precomputed SmoothGrad targets (2 samples) for 1347 images" in capsys.readouterr().out


def test_distill_second_stage_and_teacher_check(tmp_path, teacher, capsys):
    path, _ = teacher  # a standard model, not one trained at temperature 50: the run warns
    train_cli(tmp_path, "--method", "distill", "--teacher", str(path))
    for r in rows(tmp_path):
        assert r["loss"] == approx(r["soft_ce"]), r
    captured = capsys.readouterr()
    assert "distill (stage 2, student)" in captured.out
    assert "the teacher was trained with method='standard'" in captured.err


def test_init_from_starts_from_the_given_weights(tmp_path, teacher):
    from jsigr_fast.train import TrainConfig, Trainer

    path, tckpt = teacher
    plain = tmp_path / "plain.pt"  # a bare state_dict, as `jsigr-fast demo` writes, with DDP's "module." prefix
    torch.save({"module." + k: v for k, v in tckpt["model"].items() if not k.startswith("normalize.")}, plain)
    for source in (path, plain):
        t = Trainer(TrainConfig(method="jacobian", init_from=str(source), out=str(tmp_path / "run"), threads=1,
                                progress=False, tensorboard=False, model_args={"activation": "gelu"}))
        try:
            assert all(torch.equal(t.net.state_dict()[k], v) for k, v in tckpt["model"].items())
        finally:
            t.close()


def test_throughput_report_for_the_imagenet_recipe(tmp_path, capsys):
    import json

    out = tmp_path / "tp"
    assert main(["train", "--dataset", "imagenet", "--synthetic", "true", "--image-size", "16", "--batch-size", "4",
                 "--method", "pgd_at", "--attack-steps", "1", "--throughput-steps", "2", "--throughput-warmup", "1",
                 "--channels-last", "--out", str(out), *QUIET]) == 0
    rep = json.loads((out / "throughput.json").read_text())
    assert rep["model"] == "resnet18" and rep["input_shape"] == [3, 16, 16] and rep["epoch_images"] == 1_281_167
    assert rep["img_per_s"] == pytest.approx(2 * 4 / rep["seconds"])
    proj = rep["projection"]
    assert proj["one_device_s"] == pytest.approx(1_281_167 / rep["img_per_s"])
    assert proj["eight_devices_s"] == pytest.approx(proj["one_device_s"] / 8)
    assert rep["skipped_steps"] == 0 and not (out / "last.pt").exists()
    assert "img/s" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# the methods' losses against independent computations
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def batch():
    from jsigr_fast.data import Digits
    from jsigr_fast.models import get_model

    ds = Digits("train")
    x = torch.stack([ds[i][0] for i in range(12)])
    y = torch.tensor([ds[i][1] for i in range(12)])
    torch.manual_seed(1)
    model = get_model("digits_cnn", dataset="digits", activation="gelu")
    torch.manual_seed(2)
    other = get_model("digits_cnn", dataset="digits", activation="gelu")
    return model, other, x, y


def make_method(name, seed=5, state=None, **overrides):
    from jsigr_fast.train.config import TrainConfig, resolve
    from jsigr_fast.train.methods import METHODS, MethodContext

    cfg = resolve(TrainConfig(method=name, **overrides))
    arch = {"model": "digits_cnn", "kwargs": {"num_classes": 10, "in_channels": 1, "activation": "gelu"}}
    ctx = MethodContext(cfg=cfg, device=torch.device("cpu"), input_shape=(1, 8, 8), arch=arch,
                        generator=torch.Generator().manual_seed(seed), total_steps=10)
    return METHODS[name](cfg, ctx, state=state), cfg


def test_fgsm_random_start_is_wong_et_al(batch):
    model, _, x, y = batch
    method, cfg = make_method("fgsm_at")
    loss, _ = method.loss(model, x, y, [], step=0)
    eps, g = cfg.attack_eps, torch.Generator().manual_seed(5)
    x1 = (x + (2 * torch.rand(x.shape, generator=g) - 1) * eps).clamp(0, 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x1), y, reduction="sum"), x1)
    x_adv = (x + (x1.detach() + 1.25 * eps * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    torch.testing.assert_close(loss, F.cross_entropy(model(x_adv), y))
    assert loss > F.cross_entropy(model(x), y)


def test_fgsm_clean_adv_uses_the_predicted_label(batch):
    from jsigr_fast.attacks import fgsm

    model, _, x, y = batch
    method, cfg = make_method("fgsm_at", fgsm_variant="clean_adv")
    loss, terms = method.loss(model, x, y, [], step=0)
    pred = model(x).argmax(1)
    assert not torch.equal(pred, y)  # an untrained model: predicted and true labels differ
    x_f = fgsm(model, x, pred, cfg.attack_eps)
    expected = 0.5 * (F.cross_entropy(model(x), y) + F.cross_entropy(model(x_f), y))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(terms["ce_adv"], F.cross_entropy(model(x_f), y))


def test_pgd_at_trains_on_madry_examples(batch):
    from jsigr_fast.attacks import pgd

    model, _, x, y = batch
    method, cfg = make_method("pgd_at", dataset="mnist")  # mnist preset: eps 0.3, 40 steps of 0.01
    loss, _ = method.loss(model, x, y, [], step=0)
    x_adv = pgd(model, x, y, 0.3, alpha=0.01, steps=40, random_start=True, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss, F.cross_entropy(model(x_adv), y))


def test_distill_soft_labels_at_temperature(batch):
    model, teacher, x, y = batch
    arch = {"model": "digits_cnn", "kwargs": {"num_classes": 10, "in_channels": 1, "activation": "gelu"}}
    method, _ = make_method("distill", state={"teacher": teacher.state_dict(), "teacher_arch": arch}, temperature=20.0)
    loss, _ = method.loss(model, x, y, [], step=0)
    soft = F.softmax(teacher(x) / 20, 1)
    torch.testing.assert_close(loss, -(soft * F.log_softmax(model(x) / 20, 1)).sum(1).mean())
    stage1, _ = make_method("distill", temperature=20.0)
    torch.testing.assert_close(stage1.loss(model, x, y, [], step=0)[0], F.cross_entropy(model(x) / 20, y))


def test_ir_targets_are_the_teachers_smoothgrad(batch):
    import jsigr_fast

    model, teacher, x, y = batch
    arch = {"model": "digits_cnn", "kwargs": {"num_classes": 10, "in_channels": 1, "activation": "gelu"}}
    method, _ = make_method("ir", state={"teacher": teacher.state_dict(), "teacher_arch": arch}, teacher="t.pt",
                            ir_samples=6)
    loss, _ = method.loss(model, x, y, [], step=0)
    target = jsigr_fast.smoothgrad(teacher, x, y, n_samples=6, sigma=0.15, phi=1.0,
                                   generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(loss, jsigr_fast.interpretation_regularization(model, x, y, target))


def test_tensorboard_events_or_a_clear_warning(tmp_path, capsys):
    import importlib.util

    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16", "--eval-max-batches", "1",
                 "--threads", "1", "--progress", "false", "--tensorboard", "true", "--out", str(out)]) == 0
    if importlib.util.find_spec("tensorboard") is None:
        assert "TensorBoard logging is off: No module named 'tensorboard'" in capsys.readouterr().err
        assert not (out / "tb").exists()
    else:
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(out / "tb"))
    # log_every 10: one row, for the last step
    assert (out / "steps.csv").read_text().count("\n") == 1 + 1 and (out / "epochs.csv").exists()
