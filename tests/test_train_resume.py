"""Checkpoints: kill -9 / SIGTERM then --resume gives exactly the uninterrupted run's weights;
atomic writes; weights_only reads; bad checkpoints fail clearly."""
import csv
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

from jsigr_fast.cli import main
from jsigr_fast.train import TrainConfig, train
from jsigr_fast.train.trainer import STEP_DELAY_ENV

QUIET = ["--threads", "1", "--progress", "false", "--tensorboard", "false"]
# J-SIGR (the most state: adaptor, discriminator, their Adam states, the noise generator) with Adam
# and a cosine schedule; 3 epochs of 6 steps.
RUN = ["train", "--method", "jsigr", "--epochs", "3", "--steps-per-epoch", "6", "--batch-size", "32",
       "--optimizer", "adam", "--lr", "2e-3", "--disc-every", "4", "--eval-max-batches", "2", *QUIET]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path):
    return torch.load(path, weights_only=True)


def assert_same_state(a, b):
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ca, cb = a["method"]["criterion"], b["method"]["criterion"]
    for k, v in ca.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, cb[k]), k
    assert ca["gan._extra_state"]["steps"] == cb["gan._extra_state"]["steps"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    assert torch.equal(a["rng"]["ranks"][0]["generators"]["method"], b["rng"]["ranks"][0]["generators"]["method"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    assert main([*RUN, "--out", str(out)]) == 0
    return load(out / "last.pt")


def start(out, delay="0.15"):
    env = dict(os.environ, **{STEP_DELAY_ENV: delay})
    return subprocess.Popen([sys.executable, "-m", "jsigr_fast", *RUN, "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


def test_kill_9_then_resume_is_bit_exact(tmp_path, reference):
    out = tmp_path / "run"
    proc = start(out)
    wait_for(out / "last.pt", proc)  # written at the end of epoch 1; epoch 2 is under way
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    ckpt = load(out / "last.pt")
    assert (ckpt["epoch"], ckpt["batch"], ckpt["global_step"]) == (1, 0, 6)
    steps_logged = (out / "steps.csv").read_text().count("\n") - 1
    assert main(["train", "--resume", str(out), *QUIET]) == 0  # the config comes from the checkpoint
    final = load(out / "last.pt")
    assert (final["epoch"], final["global_step"]) == (3, 18)
    assert_same_state(final, reference)
    for k in ("loss", "ce", "sig", "jac", "eval_clean"):  # the last epoch's logged means and accuracy
        assert final["metrics"][k] == reference["metrics"][k], k
    # rows the killed run logged after its checkpoint were dropped: one row per logged step, in order
    lines = (out / "steps.csv").read_text().splitlines()[1:]
    steps = [int(line.split(",")[2]) for line in lines]
    assert steps == sorted(set(steps)) and steps[-1] == 18 and steps_logged >= 1


def test_sigterm_checkpoints_mid_epoch_and_resume_is_bit_exact(tmp_path, reference):
    out = tmp_path / "run"
    proc = start(out)
    wait_for(out / "last.pt", proc)
    time.sleep(0.35)  # two or three steps into epoch 2
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "received SIGTERM: finishing the current step" in stderr and "stopped by SIGTERM at epoch 2" in stderr
    ckpt = load(out / "last.pt")
    assert ckpt["epoch"] == 1 and 0 < ckpt["batch"] < 6 and ckpt["global_step"] == 6 + ckpt["batch"]
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # the temporary file was renamed into place
    assert main(["train", "--resume", str(out / "last.pt"), *QUIET]) == 0
    assert_same_state(load(out / "last.pt"), reference)


class StopAt(nn.Module):
    """digits_cnn that sends its own process SIGTERM during the given (1-based) training forward:
    the trainer finishes that step, checkpoints and stops, exactly there."""

    def __init__(self, at=None):
        super().__init__()
        from jsigr_fast.models import get_model

        torch.manual_seed(0)
        self.net = get_model("digits_cnn", dataset="digits")
        self.at, self.calls = at, 0

    def forward(self, x):
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.at:
                signal.raise_signal(signal.SIGTERM)
        return self.net(x)


def epoch_rows(out):
    with open(out / "epochs.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("at", [2, 3], ids=["mid_epoch", "last_step"])
def test_an_interrupted_epoch_reports_the_means_of_all_its_steps(tmp_path, at):
    # epochs.csv's means of the interrupted epoch covered only the steps after the resume, and none at
    # all when the stop came on the epoch's last step; the checkpoint now carries the totals so far
    cfg = dict(method="input_grad", epochs=2, steps_per_epoch=3, batch_size=16, optimizer="adam", lr=1e-3,
               threads=1, progress=False, tensorboard=False, eval_max_batches=1)
    assert train(TrainConfig(**cfg, out=str(tmp_path / "whole")), model=StopAt()) == 0
    out = tmp_path / "split"
    assert train(TrainConfig(**cfg, out=str(out)), model=StopAt(at)) == 128 + signal.SIGTERM
    ckpt = load(out / "last.pt")
    assert (ckpt["epoch"], ckpt["batch"]) == (0, at)
    assert ckpt["epoch_partial"]["counts"] == {"loss": at, "ce": at, "ig": at}
    assert ckpt["epoch_partial"]["images"] == 16 * at
    assert train(TrainConfig(**cfg, out=str(out)), resume=str(out), model=StopAt()) == 0
    whole, split = epoch_rows(tmp_path / "whole"), epoch_rows(out)
    assert len(whole) == len(split) == 2
    for a, b in zip(whole, split):  # the same steps summed in the same order: equal to the last bit
        assert {k: a[k] for k in ("epoch", "loss", "ce", "ig", "eval_clean")} == \
            {k: b[k] for k in ("epoch", "loss", "ce", "ig", "eval_clean")}
        assert float(b["seconds"]) > 0 and float(b["img_per_s"]) > 0
    assert load(out / "last.pt")["epoch_partial"] is None  # written at an epoch's end


def test_resume_refuses_a_different_trajectory_and_allows_more_epochs(tmp_path, reference, capsys):
    out = tmp_path / "run"
    assert main([*RUN, "--epochs", "1", "--out", str(out)]) == 0
    assert main(["train", "--resume", str(out), "--lr", "0.1", *QUIET]) == 2
    assert "cannot resume with a different lr: 0.002 -> 0.1" in capsys.readouterr().err
    capsys.readouterr()
    # a finished run: one true statement, not "finished 1 of 1" beside "resumed at epoch 2"
    assert main(["train", "--resume", str(out), *QUIET]) == 0
    text = capsys.readouterr().out
    assert f"resumed from {out / 'last.pt'}, which has finished 1 of 1 epochs: nothing to do (raise --epochs" in text
    assert "at epoch 2" not in text and "already finished" not in text
    assert main(["train", "--resume", str(out), "--epochs", "2", *QUIET]) == 0
    captured = capsys.readouterr()
    assert "resuming with epochs 1 -> 2: the cosine LR schedule is stretched to the new total of 12 steps" in \
        captured.err
    assert f"resumed from {out / 'last.pt'}: epoch 2 of 2, from its start" in captured.out
    assert load(out / "last.pt")["epoch"] == 2 and load(out / "last.pt")["config"]["epochs"] == 2
    # config.yaml stays the config the run started with; the resume's change is recorded under it
    import yaml

    config_text = (out / "config.yaml").read_text()
    assert yaml.safe_load(config_text)["epochs"] == 1
    assert config_text.endswith("# resumed at epoch 2, step 0 (global step 6) with epochs 1 -> 2\n"), config_text
    # fewer epochs than the checkpoint has finished cannot be honoured: refused, nothing written
    before = snapshot(out)
    assert main(["train", "--resume", str(out), "--epochs", "1", *QUIET]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {out / 'last.pt'} has already finished 2 epochs: --epochs 1 would end before that" in err
    assert snapshot(out) == before
    # --resume auto: a fresh folder starts, an existing one continues
    fresh = tmp_path / "fresh"
    assert main([*RUN, "--epochs", "1", "--steps-per-epoch", "1", "--out", str(fresh), "--resume", "auto"]) == 0
    assert "no " + str(fresh / "last.pt") + " yet, starting a new run" in capsys.readouterr().out


SMALL = ["train", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16", "--eval-max-batches", "1",
         "--log-every", "1", *QUIET]


def snapshot(out):
    return {f: (out / f).read_bytes() for f in sorted(os.listdir(out)) if (out / f).is_file()}


def test_a_used_run_folder_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*SMALL, "--out", str(out)]) == 0
    before = snapshot(out)
    assert {"last.pt", "steps.csv", "epochs.csv", "config.yaml"} <= set(before)
    capsys.readouterr()
    # a second run into the folder (the default --out makes this easy) is refused, touching nothing
    assert main([*SMALL, "--lr", "0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (f"jsigr-fast train: error: {out} already holds a run (last.pt, steps.csv, epochs.csv): pass --resume to "
            f"continue it, --overwrite to start over in it") in err and "or choose another --out" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert snapshot(out) == before
    # a throughput measurement writes only its report, so it may share the folder
    assert main([*SMALL, "--throughput-steps", "1", "--throughput-warmup", "0", "--out", str(out)]) == 0
    assert snapshot(out) == before | {"throughput.json": (out / "throughput.json").read_bytes()}
    # --resume and --overwrite contradict each other
    assert main(["train", "--resume", str(out), "--overwrite", *QUIET]) == 2
    assert "--overwrite starts a new run and --resume continues one" in capsys.readouterr().err
    # --overwrite starts over: the logs hold the new run's rows only, the checkpoint and config are the new run's
    assert main([*SMALL, "--lr", "0.5", "--overwrite", "--out", str(out)]) == 0
    assert f"--overwrite: starting over in {out} (its last.pt, steps.csv, epochs.csv are replaced)" in \
        capsys.readouterr().out
    steps = (out / "steps.csv").read_text().splitlines()
    assert [int(line.split(",")[2]) for line in steps[1:]] == [1, 2]
    assert len((out / "epochs.csv").read_text().splitlines()) == 2
    assert load(out / "last.pt")["config"]["lr"] == 0.5 and "lr: 0.5" in (out / "config.yaml").read_text()
    assert not [f for f in os.listdir(out) if f.endswith(".old")]  # nothing moved aside either


def test_resume_into_a_folder_holding_another_run_needs_overwrite(tmp_path, capsys):
    """--resume CKPT --out OTHER wrote OTHER's last.pt and appended to its logs whatever OTHER held."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*SMALL, "--out", str(a)]) == 0
    assert main([*SMALL, "--lr", "0.5", "--out", str(b)]) == 0
    before_a, before_b = snapshot(a), snapshot(b)
    capsys.readouterr()
    assert main(["train", "--resume", str(a), "--epochs", "2", "--out", str(b), *QUIET]) == 2
    err = capsys.readouterr().err
    assert (f"jsigr-fast train: error: {b} already holds another run (last.pt, steps.csv, epochs.csv); resuming "
            f"{a / 'last.pt'} there would overwrite it: pass --resume {b} to continue that run, --overwrite to "
            f"replace it with the resumed run, or choose another --out") in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert snapshot(a) == before_a and snapshot(b) == before_b
    # logs without a checkpoint: nothing to --resume there, so that is not suggested
    logs_only = tmp_path / "logs_only"
    logs_only.mkdir()
    (logs_only / "steps.csv").write_bytes(before_b["steps.csv"])
    assert main(["train", "--resume", str(a), "--epochs", "2", "--out", str(logs_only), *QUIET]) == 2
    err = capsys.readouterr().err
    assert f"{logs_only} already holds another run (steps.csv); resuming" in err and "--resume" not in \
        err.split("would overwrite it")[1], err
    # in place still continues, however --out spells the checkpoint's folder; --overwrite there still contradicts
    assert main(["train", "--resume", str(a / "last.pt"), "--overwrite", "--out", str(a), *QUIET]) == 2
    assert "--overwrite starts a new run and --resume continues one" in capsys.readouterr().err
    assert main(["train", "--resume", str(a / "last.pt"), "--epochs", "2", "--out", str(a) + os.sep, *QUIET]) == 0
    assert load(a / "last.pt")["global_step"] == 4
    before_a = snapshot(a)
    # --overwrite: b now holds a's run continued, with its own config and logs only; a is untouched
    capsys.readouterr()
    assert main(["train", "--resume", str(a), "--epochs", "3", "--out", str(b), "--overwrite", *QUIET]) == 0
    assert (f"--overwrite: resuming {a / 'last.pt'} in {b} (its last.pt, steps.csv, epochs.csv are replaced)"
            in capsys.readouterr().out)
    ckpt = load(b / "last.pt")
    assert ckpt["global_step"] == 6 and ckpt["config"]["lr"] != 0.5
    steps = (b / "steps.csv").read_text().splitlines()
    assert [int(line.split(",")[2]) for line in steps[1:]] == [5, 6]  # none of b's old rows (1, 2)
    assert [line.split(",")[0] for line in (b / "epochs.csv").read_text().splitlines()[1:]] == ["3"]
    assert "lr: 0.5" not in (b / "config.yaml").read_text()
    assert snapshot(a) == before_a
    # a folder holding nothing needs no --overwrite
    assert main(["train", "--resume", str(a), "--epochs", "3", "--out", str(tmp_path / "c"), *QUIET]) == 0


def test_logs_without_a_checkpoint_count_as_a_run(tmp_path, capsys):
    """A run killed in its first epoch leaves logged steps but no checkpoint: a new run must not
    append to them; --resume auto (a restart loop) starts over and says it clears them."""
    out = tmp_path / "run"
    assert main([*SMALL, "--out", str(out)]) == 0
    os.unlink(out / "last.pt")
    assert main([*SMALL, "--out", str(out)]) == 2
    assert "already holds a run (steps.csv, epochs.csv)" in capsys.readouterr().err
    assert main([*SMALL, "--resume", "auto", "--out", str(out)]) == 0
    assert "--resume auto: no " + str(out / "last.pt") + " yet, starting a new run; the logs of the earlier " \
        "attempt (steps.csv, epochs.csv) are cleared" in capsys.readouterr().out
    steps = (out / "steps.csv").read_text().splitlines()
    assert [int(line.split(",")[2]) for line in steps[1:]] == [1, 2]
    # a folder where a run failed before its first step (config.yaml, header-only logs) holds nothing to lose
    fresh = tmp_path / "failed"
    fresh.mkdir()
    (fresh / "config.yaml").write_text("method: standard\n")
    (fresh / "steps.csv").write_text(steps[0] + "\n")
    assert main([*SMALL, "--out", str(fresh)]) == 0


def test_fewer_epochs_compress_the_schedule_and_move_jarn_start(tmp_path, capsys):
    out = tmp_path / "jarn"
    jarn = ["train", "--method", "jarn", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16",
            "--eval-max-batches", "1", *QUIET]
    assert main([*jarn, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--epochs", "2", *QUIET]) == 0
    err = capsys.readouterr().err
    assert ("jarn_start 0.75 is a fraction of all training steps, so JARN now starts at step 3 instead of 2 "
            "(the run is at step 2)") in err, err
    # a checkpoint of a 4-epoch run after its first epoch, resumed to end after 2: compressed, said so
    ckpt = load(out / "last.pt")
    ckpt["config"]["epochs"], ckpt["epoch"], ckpt["global_step"] = 4, 1, 2
    torch.save(ckpt, out / "last.pt")
    assert main(["train", "--resume", str(out), "--epochs", "2", *QUIET]) == 0
    err = capsys.readouterr().err
    assert "resuming with epochs 4 -> 2: the cosine LR schedule is compressed to the new total of 4 steps" in err
    assert "JARN now starts at step 3 instead of 6 (the run is at step 2)" in err


def test_more_epochs_on_a_step_schedule_warn_that_the_lr_goes_back_up(tmp_path, capsys):
    # milestones are fractions of the run: 2 -> 4 epochs moves milestone 0.5 from step 2 to step 4, past
    # the resume point, so the finished run's lr 0.1 * 0.1**2 returns to 0.1 * 0.1; "stretched" hid that.
    out = tmp_path / "step"
    run = ["train", "--schedule", "step", "--log-every", "1", "--lr", "0.1", "--epochs", "2", "--steps-per-epoch", "2",
           "--batch-size", "8", "--eval-max-batches", "1", *QUIET]
    assert main([*run, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--epochs", "4", *QUIET]) == 0
    err = capsys.readouterr().err
    assert ("resuming with epochs 2 -> 4: the step LR schedule is stretched to the new total of 8 steps from here "
            "on: the lr goes back up from 0.001 to 0.01 at global step 5, the first resumed one; its milestones are "
            "fractions of the run and move from global steps 3, 4 to 5, 7, and "
            "one that moves past the resume point undoes its decay") in err, err
    # ... which is what the run did (steps.csv: global_step, lr), from the first resumed step on: the
    # rebuilt schedule's lr, not the checkpoint's (that was one step late: 0.001 at global step 5)
    with open(out / "steps.csv", newline="") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.01, 0.01, 0.001, 0.001])


def test_resume_does_not_need_the_teacher_file_any_more(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    assert main(["train", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "16", "--out", str(teacher),
                 "--eval-max-batches", "1", *QUIET]) == 0
    moved = tmp_path / "t.pt"
    os.replace(teacher / "last.pt", moved)
    run = ["train", "--method", "ir", "--teacher", str(moved), "--ir-samples", "2", "--epochs", "2",
           "--steps-per-epoch", "2", "--batch-size", "16", "--eval-max-batches", "1", *QUIET]
    assert main([*run, "--out", str(tmp_path / "a")]) == 0
    assert main([*run, "--epochs", "1", "--out", str(tmp_path / "b")]) == 0
    os.unlink(moved)
    assert main(["train", "--resume", str(tmp_path / "b"), "--epochs", "2", *QUIET]) == 0
    a, b = load(tmp_path / "a" / "last.pt"), load(tmp_path / "b" / "last.pt")
    assert all(torch.equal(a["method"]["teacher"][k], v) for k, v in b["method"]["teacher"].items())
    b["method"]["teacher_arch"] = "digits_cnn"  # a damaged teacher record: named, not a traceback
    torch.save(b, tmp_path / "bad_teacher.pt")
    assert main(["train", "--resume", str(tmp_path / "bad_teacher.pt"), *QUIET]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {tmp_path / 'bad_teacher.pt'}: 'method': the teacher needs 'teacher'" in err, err
    assert "Traceback" not in err


def test_fp16_grad_scaler_state_is_checkpointed(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--method", "input_grad", "--amp", "fp16", "--epochs", "1", "--steps-per-epoch", "2",
                 "--batch-size", "8", "--eval-max-batches", "1", "--out", str(out), *QUIET]) == 0
    ckpt = load(out / "last.pt")
    assert ckpt["scaler"]["scale"] > 0 and ckpt["scaler"]["_growth_tracker"] >= 0
    assert ckpt["config"]["amp"] == "fp16" and ckpt["global_step"] == 2


# --------------------------------------------------------------------------------------------------
# untrusted and broken checkpoints
# --------------------------------------------------------------------------------------------------
class Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def good(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "last.pt"
    torch.save(reference, path)
    return path


def test_bad_checkpoints_fail_clearly(tmp_path, good, capsys):
    marker = tmp_path / "code-ran"
    cases = {
        "garbage.pt": (b"this is not a checkpoint", "is not a readable PyTorch file"),
        "truncated.pt": (good.read_bytes()[:5000], "is not a readable PyTorch file"),
        "empty.pt": (b"", "is not a readable PyTorch file"),
    }
    for name, (data, fragment) in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "state_dict.pt")
    cases["state_dict.pt"] = (None, "is not a jsigr-fast training checkpoint (no 'format' entry)")
    torch.save({"format": "jsigr_fast.train/99"}, tmp_path / "future.pt")
    cases["future.pt"] = (None, "has checkpoint format 'jsigr_fast.train/99'")
    with open(tmp_path / "evil.pt", "wb") as f:  # a plain pickle, as torch.save(weights_only=False) would accept
        pickle.dump({"format": "jsigr_fast.train/1", "model": Payload(str(marker))}, f)
    cases["evil.pt"] = (None, "refused rather than unpickled")
    torch.save({"format": "jsigr_fast.train/1", "model": Payload(str(marker))}, tmp_path / "evil2.pt")
    cases["evil2.pt"] = (None, "contains Python objects other than tensors and plain containers")
    incomplete = {k: v for k, v in load(good).items() if k != "optimizer"}
    torch.save(incomplete, tmp_path / "incomplete.pt")
    cases["incomplete.pt"] = (None, "is incomplete: missing optimizer")
    for name, (_, fragment) in cases.items():
        assert main(["train", "--resume", str(tmp_path / name), *QUIET]) == 2, name
        err = capsys.readouterr().err
        assert fragment in err and "Traceback" not in err, (name, err)
    assert not marker.exists()  # weights_only: the payload never ran
    # the same files as --init-from / --teacher (in a folder of the test's own: the default --out,
    # runs/<dataset>-<method> under the working directory, may hold a real run, which would be refused first)
    out = ["--out", str(tmp_path / "run")]
    assert main(["train", "--init-from", str(tmp_path / "evil2.pt"), *out, *QUIET]) == 2
    assert "refused rather than unpickled" in capsys.readouterr().err
    assert main(["train", "--method", "distill", "--teacher", str(tmp_path / "garbage.pt"), *out, *QUIET]) == 2
    assert "is not a readable PyTorch file" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("field, value, fragment", [
    ("epoch", "three", "'epoch' must be an integer >= 0, got str 'three'"),
    ("global_step", -1, "'global_step' must be an integer >= 0, got int -1"),
    ("batch", 1.5, "'batch' must be an integer >= 0, got float 1.5"),
    ("config", ["method"], "'config' must be a mapping, got list"),
    ("config", {"method": "jsigr", "epochs": "many"}, "'config': config key 'epochs' must be an integer"),
    ("model", None, "'model' must be a mapping, got NoneType"),
    ("optimizer", {"state": {}}, "'optimizer' does not fit this run: 'param_groups'"),
    ("scheduler", 7, "'scheduler' must be a mapping, got int 7"),
    ("scaler", "big", "'scaler' must be a mapping or None, got str 'big'"),
    ("counters", [0, 1], "'counters' must be a mapping of names to integers >= 0, got list"),
    ("counters", {"images": "many"}, "'counters' must be a mapping of names to integers >= 0, got dict"),
    ("metrics", "good", "'metrics' must be a mapping or None, got str 'good'"),
    ("rng", {"world_size": 1}, "'rng' must be {'world_size': N, 'ranks': [N per-rank states]}"),
    ("rng", {"world_size": 1, "ranks": [{"torch": torch.zeros(3)}]}, "'rng' of rank 0 cannot be restored"),
    ("method", [1], "'method' must be a mapping, got list"),
    ("epoch_partial", {"sums": {"loss": 1.0}, "counts": {}, "seconds": 1.0, "images": 3},
     "'epoch_partial' must be None or {'sums': {term: float}, 'counts': {term: int}, 'seconds': float, 'images': int}"),
    ("epoch_partial", {"sums": {"loss": "1"}, "counts": {"loss": 1}, "seconds": 1.0, "images": 3},
     "'epoch_partial' must be None or"),
    ("epoch_partial", [1.0], "'epoch_partial' must be None or"),
    ("best", {"metric": "eval_adv", "value": 1, "epoch": 2},
     "'best' must be None or {'metric': 'eval_clean' | 'eval_adv', 'value': float, 'epoch': int}"),
    ("method", {"criterion": 5}, "'method': the jsigr adaptor/discriminator state does not fit this configuration"),
])
def test_malformed_checkpoint_fields_name_the_file_and_the_field(tmp_path, good, capsys, field, value, fragment):
    ckpt = load(good)
    ckpt[field] = value
    path = tmp_path / "bad.pt"
    torch.save(ckpt, path)
    assert main(["train", "--resume", str(path), *QUIET]) == 2
    err = capsys.readouterr().err
    assert f"jsigr-fast train: error: checkpoint {path}: {fragment}" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == ["bad.pt"]  # nothing written beside it


def test_foreign_weights_do_not_fit(tmp_path, capsys):
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    assert main(["train", "--init-from", str(tmp_path / "other.pt"), "--out", str(tmp_path / "r"), *QUIET]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model (missing features.0.weight" in err and "unexpected conv.weight" in err
    from jsigr_fast.models import get_model

    torch.save(get_model("digits_cnn", dataset="digits", num_classes=7).state_dict(), tmp_path / "seven.pt")
    assert main(["train", "--init-from", str(tmp_path / "seven.pt"), "--out", str(tmp_path / "r"), *QUIET]) == 2
    assert "size mismatch for fc.weight" in capsys.readouterr().err


def test_checkpoint_holds_only_plain_values(good):
    """Every leaf is a tensor or a primitive: what weights_only accepts, and nothing else."""

    def leaves(obj, path="ckpt"):
        if isinstance(obj, dict):
            for k, v in obj.items():
                assert isinstance(k, (str, int)), path
                yield from leaves(v, f"{path}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from leaves(v, f"{path}[{i}]")
        else:
            yield path, obj

    kinds = {type(v) for _, v in leaves(load(good))}
    assert kinds <= {torch.Tensor, int, float, str, bool, type(None)}, kinds


def test_save_atomic_never_leaves_a_torn_file(tmp_path, monkeypatch):
    from jsigr_fast.train.checkpoint import save_atomic

    path = tmp_path / "last.pt"
    save_atomic({"v": torch.ones(3)}, str(path))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"v": torch.zeros(3)}, str(path))
    assert torch.equal(load(path)["v"], torch.ones(3))  # the old checkpoint is intact
    assert os.listdir(tmp_path) == ["last.pt"]  # and the temporary file is gone


def test_copy_atomic_never_leaves_a_torn_file(tmp_path, monkeypatch):
    from jsigr_fast.train.checkpoint import copy_atomic

    (tmp_path / "new.pt").write_bytes(b"new" * 1000)
    (tmp_path / "best.pt").write_bytes(b"old")
    monkeypatch.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        copy_atomic(str(tmp_path / "new.pt"), str(tmp_path / "best.pt"))
    assert (tmp_path / "best.pt").read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["best.pt", "new.pt"]
    monkeypatch.undo()
    copy_atomic(str(tmp_path / "new.pt"), str(tmp_path / "best.pt"))
    assert (tmp_path / "best.pt").read_bytes() == b"new" * 1000
