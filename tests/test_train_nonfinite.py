"""A non-finite loss skips the step (counted), never reaches the weights, and stops the run when it persists."""
import csv
import warnings

import pytest
import torch
import torch.nn as nn

from jsigr_fast.cli import main
from jsigr_fast.train import NonFiniteError, TrainConfig, train

QUIET = dict(threads=1, progress=False, tensorboard=False, eval_max_batches=1, log_every=1)


class NaNAt(nn.Module):
    """digits_cnn whose logits are NaN on the given (1-based) training forwards."""

    def __init__(self, bad):
        super().__init__()
        from jsigr_fast.models import get_model

        self.net = get_model("digits_cnn", dataset="digits")
        self.bad, self.calls = set(bad), 0

    def forward(self, x):
        out = self.net(x)
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            if self.calls in self.bad:
                out = out * float("nan")
        return out


def finite(state):
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_nan_steps_are_skipped_and_counted(tmp_path):
    model = NaNAt(bad={3, 4})
    cfg = TrainConfig(method="standard", epochs=1, steps_per_epoch=6, batch_size=16, optimizer="adam", lr=1e-3,
                      out=str(tmp_path), **QUIET)
    assert train(cfg, model=model) == 0
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["counters"]["nonfinite_total"] == 2 and ckpt["counters"]["nonfinite_consecutive"] == 0
    assert ckpt["global_step"] == 6 and ckpt["scheduler"]["last_epoch"] == 6  # the schedule kept its pace
    assert {int(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {4}  # 4 of 6 optimizer steps taken
    assert finite(ckpt["model"])
    with open(tmp_path / "steps.csv", newline="") as f:
        logged = list(csv.DictReader(f))
    assert [r["loss"] == "" for r in logged] == [False, False, True, True, False, False]
    assert [int(r["nonfinite_total"]) for r in logged] == [0, 0, 1, 2, 2, 2]


def test_persistent_nan_stops_with_the_last_good_checkpoint(tmp_path):
    model = NaNAt(bad=range(5, 100))  # from the second step of epoch 2 on
    cfg = TrainConfig(method="standard", epochs=3, steps_per_epoch=4, batch_size=16, optimizer="sgd", lr=0.05,
                      max_nonfinite=3, out=str(tmp_path), **QUIET)
    with pytest.raises(NonFiniteError,
                       match=r"the loss was non-finite for 3 consecutive steps \(epoch 2, batch 3, global step 7\)"
                             r".* The last checkpoint is .*last.pt \(end of epoch 1\)"):
        train(cfg, model=model)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and finite(ckpt["model"])  # epoch 1's checkpoint, never overwritten
    assert finite(model.state_dict())  # the skipped steps never touched the weights
    with open(tmp_path / "steps.csv", newline="") as f:  # the failing step's row is logged too
        logged = list(csv.DictReader(f))
    assert [int(r["global_step"]) for r in logged] == list(range(1, 8))
    assert [r["loss"] for r in logged[-3:]] == ["", "", ""] and logged[-1]["nonfinite_total"] == "3"


def test_jsigr_adaptor_survives_a_nan_batch(tmp_path):
    # J-SIGR runs 2 training forwards per step: the last step's saliency and loss passes, so the
    # checkpoint comes right after a skipped step and must not find (and warn about) its staged update
    model = NaNAt(bad={9, 10})
    cfg = TrainConfig(method="jsigr", epochs=1, steps_per_epoch=5, batch_size=16, optimizer="adam", lr=1e-3,
                      disc_every=1, out=str(tmp_path), **QUIET)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*pending adaptor/discriminator update")
        assert train(cfg, model=model) == 0
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["counters"]["nonfinite_total"] == 1
    crit = ckpt["method"]["criterion"]
    # the skipped step committed no adaptor/discriminator update: 4 of 5 steps taken, none refused
    assert crit["gan._extra_state"]["steps"] == 4 and crit["gan._extra_state"]["skipped_steps"] == 0
    assert all(torch.isfinite(v).all() for v in crit.values() if isinstance(v, torch.Tensor))


def test_divergence_from_the_cli_exits_3(tmp_path, capsys):
    rc = main(["train", "--lr", "1e30", "--optimizer", "sgd", "--max-nonfinite", "2", "--epochs", "1",
               "--steps-per-epoch", "8", "--batch-size", "16", "--out", str(tmp_path), "--threads", "1",
               "--progress", "false", "--tensorboard", "false"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "non-finite for 2 consecutive steps" in err and "Try a lower --lr" in err and "Traceback" not in err
    assert "No checkpoint was written yet" in err and "last checkpoint is" not in err  # none exists
    assert not (tmp_path / "last.pt").exists()  # nothing finite to save yet: nothing written
