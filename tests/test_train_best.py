"""keep_best: best.pt is the checkpoint of the best evaluated epoch, kept across resumes, never stale."""
import pytest
import torch

from jsigr_fast.train import ConfigError, TrainConfig, train
from jsigr_fast.train.trainer import Trainer

CFG = dict(method="standard", steps_per_epoch=2, batch_size=16, optimizer="sgd", lr=0.05, schedule="constant",
           threads=1, progress=False, tensorboard=False, eval_max_batches=1)


def load(path):
    return torch.load(path, weights_only=True)


@pytest.fixture
def scripted(monkeypatch):
    """Evaluation returns the given accuracy per (1-based) epoch, so that which epoch is best is known."""
    values = {}

    def evaluate(self, epoch):
        return {"eval_clean": values[epoch + 1], "eval_adv": values[epoch + 1] / 2}

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    return values


def test_best_pt_is_the_checkpoint_of_the_best_epoch(tmp_path, scripted, capsys):
    scripted.update({1: 0.5, 2: 0.7, 3: 0.6})
    assert train(TrainConfig(**CFG, epochs=3, keep_best="eval_clean", out=str(tmp_path / "run"))) == 0
    out = capsys.readouterr().out
    assert "best eval_clean so far: best.pt" in out.splitlines()[-3]  # epoch 2's line, not epoch 3's
    best, last = load(tmp_path / "run" / "best.pt"), load(tmp_path / "run" / "last.pt")
    assert best["best"] == last["best"] == {"metric": "eval_clean", "value": 0.7, "epoch": 2}
    assert (best["epoch"], last["epoch"]) == (2, 3)
    # the same run stopped after epoch 2 (constant lr: the same trajectory) ends with best.pt's weights
    assert train(TrainConfig(**CFG, epochs=2, out=str(tmp_path / "two"))) == 0
    two = load(tmp_path / "two" / "last.pt")
    assert all(torch.equal(best["model"][k], v) for k, v in two["model"].items())
    assert any(not torch.equal(last["model"][k], v) for k, v in two["model"].items())


@pytest.mark.filterwarnings("ignore:resuming with epochs")
def test_resume_keeps_tracking_and_overwrite_removes_a_stale_best(tmp_path, scripted, capsys):
    run = tmp_path / "run"
    scripted.update({1: 0.5, 2: 0.7, 3: 0.6, 4: 0.9})
    assert train(TrainConfig(**CFG, epochs=2, keep_best="eval_adv", eval_attack="fgsm", out=str(run))) == 0
    assert train(TrainConfig(**CFG, epochs=3, out=str(run)), resume=str(run), explicit={"epochs"}) == 0
    assert load(run / "best.pt")["epoch"] == 2 and load(run / "last.pt")["best"]["value"] == 0.35
    # into another folder: best.pt comes along with its record
    other = tmp_path / "other"
    assert train(TrainConfig(**CFG, epochs=4, out=str(other)), resume=str(run), explicit={"epochs", "out"}) == 0
    assert load(other / "best.pt")["best"] == {"metric": "eval_adv", "value": 0.45, "epoch": 4}
    assert load(run / "best.pt")["epoch"] == 2  # the source run is untouched
    capsys.readouterr()
    # a new run there must not leave the old run's best.pt beside its own checkpoint
    with pytest.raises(ConfigError, match=r"already holds a run \(last.pt, best.pt, steps.csv, epochs.csv\)"):
        train(TrainConfig(**CFG, epochs=1, out=str(run)))
    assert train(TrainConfig(**CFG, epochs=1, out=str(run)), overwrite=True) == 0
    assert not (run / "best.pt").exists() and load(run / "last.pt")["best"] is None


def test_keep_best_eval_adv_needs_an_eval_attack(tmp_path):
    with pytest.raises(ConfigError, match="keep_best eval_adv needs an evaluation attack: --eval-attack fgsm or pgd"):
        train(TrainConfig(**CFG, epochs=1, keep_best="eval_adv", out=str(tmp_path)))
