"""jsigr-fast train's configuration: flags, files, presets, schedule, and the errors users see."""
import json
import os
import math

import pytest

from jsigr_fast.cli import main
from jsigr_fast.train.build import lr_factor
from jsigr_fast.train.config import (ATTACK_PRESETS, TrainConfig, build_config, load_config_file, reference_markdown,
                                     resolve)
from jsigr_fast.train.errors import ConfigError

QUIET = ["--threads", "1", "--progress", "false", "--tensorboard", "false"]


def parse(argv):
    """(config, explicit keys) exactly as `jsigr-fast train ARGV` builds them."""
    import argparse

    from jsigr_fast.train import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return cli.parse(p.parse_args(argv))


def test_flags_override_file_and_file_overrides_defaults(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("method: jsigr\nlambda-m: 2\nlr: 1e-3\nmilestones: [0.3, 0.6]\nmodel_args: {activation: gelu}\n"
                 "channels_last: true\n")
    cfg, explicit = parse(["--config", str(f), "--lambda-m", "0.25", "--model-arg", "norm=group",
                           "--channels-last", "false", "--milestones", "0.2,0.4"])
    assert cfg.method == "jsigr" and cfg.lambda_m == 0.25 and cfg.lr == 1e-3  # "1e-3" is a YAML string
    assert cfg.model_args == {"activation": "gelu", "norm": "group"}  # merged key by key
    assert cfg.channels_last is False and cfg.milestones == [0.2, 0.4]
    assert cfg.epochs == TrainConfig().epochs and "epochs" not in explicit
    assert {"method", "lambda_m", "lr", "model_args", "channels_last", "milestones"} <= explicit


def test_json_config_and_bare_bool_flag(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"method": "pgd_at", "epochs": 3}))
    cfg, _ = parse(["--config", str(f), "--synthetic"])
    assert (cfg.method, cfg.epochs, cfg.synthetic) == ("pgd_at", 3, True)


@pytest.mark.parametrize("text, fragment", [
    ("lerning_rate: 0.1\n", "unknown config key 'lerning_rate' (from {f}); did you mean 'lr'?"),
    ("epochs: 2.5\n", "config key 'epochs' must be an integer (from {f}), got float 2.5"),
    ("lr: fast\n", "config key 'lr' must be a number (from {f}), got str 'fast'"),
    ("channels_last: maybe\n", "config key 'channels_last' must be true or false"),
    ("milestones: 3\n", "config key 'milestones' must be a list of numbers"),
    ("model_args: [1, 2]\n", "config key 'model_args' must be a mapping"),
    ("method: jsgir\n", "config key 'method' must be one of standard, jsigr"),
    ("batch_size: 0\n", "config key 'batch_size' must be >= 1"),
    ("lr: -0.1\n", "config key 'lr' must be > 0"),
    ("jarn_start: 1.5\n", "config key 'jarn_start' must be <= 1"),
    # torch.manual_seed overflows past 2**64 - 1, and the loader seeds epoch e with seed + e.
    ("seed: 18446744073709551616\n", "config key 'seed' must be <= 9223372036854775807"),
    ("seed: -1\n", "config key 'seed' must be >= 0"),
    ("epochs: null\n", "config key 'epochs' must be set"),
    ("- method\n", "must hold a mapping of keys to values, got list"),
    ("method: [unclosed\n", "cannot parse config file"),
    # parsers keep the last of a repeated key silently; the normalized spelling was already refused
    ("lr: 0.1\nepochs: 2\nlr: 0.2\n", "config key 'lr' is given twice in {f} (line 3)"),
    ("model_args: {width: 2, width: 3}\n", "config key 'width' is given twice in {f} (line 1)"),
    ("lambda_m: 0.1\nlambda-m: 0.2\n", "config key 'lambda_m' is given twice in {f}"),
])
def test_bad_config_file_names_the_key(tmp_path, text, fragment):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        parse(["--config", str(f)])
    assert fragment.format(f=f) in str(info.value)


def test_repeated_json_key_is_refused_and_yaml_merge_keys_may_be_overridden(tmp_path):
    f = tmp_path / "run.json"
    f.write_text('{"lr": 0.1, "lr": 0.2}')
    with pytest.raises(ConfigError, match="config key 'lr' is given twice in"):
        load_config_file(str(f))
    f = tmp_path / "run.yaml"  # "<<: *base" then an own key: YAML's override, not a repeat
    f.write_text("model_args: &base {width: 2}\nteacher_args:\n  <<: *base\n  width: 3\n")
    assert load_config_file(str(f)) == {"model_args": {"width": 2}, "teacher_args": {"width": 3}}


def test_unknown_method_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"did you mean 'jsigr'\?"):
        build_config({"method": "jsgir"})


def test_bad_flag_values_and_unknown_flags(capsys):
    with pytest.raises(ConfigError, match="'epochs' must be an integer .*--epochs"):
        parse(["--epochs", "two"])
    with pytest.raises(ConfigError, match="'nesterov' must be true or false"):
        parse(["--nesterov", "perhaps"])
    with pytest.raises(ConfigError, match="--model-arg takes KEY=VALUE"):
        parse(["--model-arg", "gelu"])
    with pytest.raises(SystemExit) as info:  # argparse: unknown flag
        main(["train", "--lerning-rate", "0.1"])
    assert info.value.code == 2 and "unrecognized arguments: --lerning-rate" in capsys.readouterr().err


def test_out_of_range_seed_is_one_line_and_exit_code_2(capsys, tmp_path):
    # 2**64 used to reach torch.manual_seed and die with "Overflow when unpacking long long", exit 1.
    assert main(["train", "--seed", str(2 ** 64), "--out", str(tmp_path / "run"), *QUIET]) == 2
    err = capsys.readouterr().err
    assert "config key 'seed' must be <= 9223372036854775807 (from --seed), got 18446744073709551616" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_cli_reports_config_errors_with_exit_code_2(capsys, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("wieght_decay: 0.1\n")
    assert main(["train", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert "jsigr-fast train: error: unknown config key 'wieght_decay'" in err and "did you mean 'weight_decay'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, fragment", [
    (["--method", "ir"], "method 'ir' needs a teacher: --teacher CKPT"),
    (["--method", "ir", "--teacher", "/nonexistent/teacher.pt"],
     "teacher checkpoint /nonexistent/teacher.pt does not exist"),
    (["--method", "distill", "--teacher", "/nonexistent/t.pt"], "teacher checkpoint /nonexistent/t.pt does not exist"),
    (["--init-from", "/nonexistent/w.pt"], "init_from checkpoint /nonexistent/w.pt does not exist"),
    (["--teacher", "{teacher}"], "--teacher is used by methods ir and distill only"),
    (["--dataset", "cifar10"], "dataset 'cifar10' needs --data-root DIR"),
    (["--dataset", "mnist", "--data-root", "{missing}"], "cannot read dataset 'mnist' at {missing}: MNIST root"),
    (["--dataset", "cifar10", "--data-root", "{empty}"], "cannot read dataset 'cifar10' at {empty}: CIFAR10: missing"),
    (["--dataset", "imagefolder", "--data-root", "{empty}"], "has no class sub-folders"),
    (["--batch-size", "5000"], "smaller than one batch of 5000 per rank"),
    (["--method", "ir", "--teacher", "{teacher}", "--dataset", "cifar10", "--data-root", "{empty}",
      "--ir-targets", "precompute"], "ir_targets=precompute needs un-augmented training images"),
    (["--method", "jacobian", "--mode", "fd", "--jacobian-estimator", "exact", "--model", "resnet20",
      "--dataset", "synthetic", "--image-size", "8", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "4"],
     "--mode fd --jacobian-estimator exact on resnet20: estimator='exact' with mode='fd' needs a model whose"),
])
def test_bad_runs_fail_with_a_clear_message(capsys, tmp_path, argv, fragment):
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"")
    (tmp_path / "empty").mkdir()
    fill = dict(teacher=teacher, missing=tmp_path / "missing", empty=tmp_path / "empty")
    argv = [a.format(**fill) for a in argv]
    assert main(["train", *argv, "--out", str(tmp_path / "run"), *QUIET]) == 2
    err = capsys.readouterr().err
    assert fragment.format(**fill) in err, err
    assert "Traceback" not in err


def test_presets_follow_the_dataset_and_method():
    def r(**kw):
        return resolve(TrainConfig(**kw))

    c = r(method="pgd_at", dataset="mnist")
    assert (c.attack_eps, c.attack_steps, c.attack_alpha) == (0.3, 40, 0.01)
    c = r(method="pgd_at", dataset="cifar10")
    assert (c.attack_eps, c.attack_steps, c.attack_alpha) == (8 / 255, 7, 2 / 255)
    c = r(method="pgd_at", dataset="imagenet")
    assert (c.attack_eps, c.attack_steps) == (16 / 255, 10)
    c = r(method="pgd_at", dataset="cifar10", attack_eps=4 / 255, attack_steps=10)  # own eps: Madry's 2.5 eps / steps
    assert math.isclose(c.attack_alpha, 2.5 * (4 / 255) / 10)
    assert r(method="standard", dataset="cifar10").attack_eps is None  # unused keys stay unset
    assert r(method="standard", eval_attack="pgd").attack_eps == ATTACK_PRESETS["digits"][0]
    c = r(method="jsigr")
    assert (c.lambda_m, c.lambda_j, c.disc, c.disc_every) == (0.5, 0.5, "mnist", 10)
    c = r(method="jsigr", dataset="cifar10")
    assert (c.disc, c.disc_every) == ("cifar", 20)
    assert r(method="jacobian", dataset="mnist").lambda_j == 0.1
    assert r(method="jacobian", dataset="cifar10").lambda_j == 0.5
    assert r(method="jarn").jarn_noise == 8 / 255 and r(method="jarn_at1").jarn_noise == 0.0
    assert r(method="jarn", disc="svhn").lambda_adv == 5.0
    assert r(method="ir", teacher="t.pt").ir_samples == 8
    assert r(method="ir", teacher="t.pt", ir_targets="precompute").ir_samples == 50
    assert r(method="jsigr", dataset="cifar10").out == "runs/cifar10-jsigr"


def test_print_config_shows_resolved_values(capsys):
    import yaml

    assert main(["train", "--method", "pgd_at", "--dataset", "cifar10", "--print-config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["attack_steps"] == 7 and shown["attack_eps"] == pytest.approx(8 / 255)
    cfg, _ = build_config(shown, flags_from_text=False)  # the printed config reads back as a config file
    assert cfg.attack_steps == 7


def test_unused_keys_draw_a_warning(capsys, tmp_path):
    assert main(["train", "--lambda-adv", "2", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "8",
                 "--eval-max-batches", "1", "--out", str(tmp_path), *QUIET]) == 0
    assert "warning: config key 'lambda_adv' is not used by method 'standard'" in capsys.readouterr().err
    assert main(["train", "--method", "input_grad", "--fd-step", "0.02", "--epochs", "1", "--steps-per-epoch", "1",
                 "--batch-size", "8", "--eval-max-batches", "1", "--out", str(tmp_path / "ig"), *QUIET]) == 0
    assert "warning: config key 'fd_step' is only used with mode fd" in capsys.readouterr().err
    # keys the method reads in other variants only: n_proj with the exact estimator, beta beside a
    # mask quantile, fgsm_alpha with the clean_adv variant (they passed silently)
    assert main(["train", "--method", "jacobian", "--jacobian-estimator", "exact", "--n-proj", "4", "--epochs", "1",
                 "--steps-per-epoch", "1", "--batch-size", "8", "--eval-max-batches", "1",
                 "--out", str(tmp_path / "jac"), *QUIET]) == 0
    assert "warning: config key 'n_proj' is not used with jacobian_estimator 'exact'" in capsys.readouterr().err
    assert main(["train", "--method", "fgsm_at", "--fgsm-variant", "clean_adv", "--fgsm-alpha", "1.0", "--epochs",
                 "1", "--steps-per-epoch", "1", "--batch-size", "8", "--eval-max-batches", "1",
                 "--out", str(tmp_path / "fgsm"), *QUIET]) == 0
    assert "warning: config key 'fgsm_alpha' is not used by fgsm_variant 'clean_adv'" in capsys.readouterr().err
    assert main(["train", "--method", "jsigr", "--mask-quantile", "0.5", "--beta", "0.2", "--epochs", "1",
                 "--steps-per-epoch", "1", "--batch-size", "8", "--eval-max-batches", "1",
                 "--out", str(tmp_path / "q"), *QUIET]) == 0
    assert "warning: config key 'beta' is not used when mask_quantile is set" in capsys.readouterr().err


def test_lr_schedules():
    kw = dict(total=100, warmup=0, milestones=[0.5, 0.75], gamma=0.1)
    assert [lr_factor(s, schedule="constant", **kw) for s in (0, 99)] == [1.0, 1.0]
    assert lr_factor(0, schedule="cosine", **kw) == 1.0
    assert lr_factor(50, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(100, schedule="cosine", **kw) == pytest.approx(0.0)
    assert [lr_factor(s, schedule="step", **kw) for s in (49, 50, 74, 75)] == pytest.approx([1, 0.1, 0.1, 0.01])
    kw["warmup"] = 10
    assert [lr_factor(s, schedule="cosine", **kw) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(55, schedule="cosine", **kw) == pytest.approx(0.5)  # cosine over the 90 steps after warm-up


def test_shipped_configs_are_valid():
    import glob
    import os

    files = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))
    assert len(files) >= 4
    methods = set()
    for f in files:
        cfg, _ = build_config(load_config_file(f), file_source=f)
        methods.add(resolve(cfg).method)
    assert {"jsigr", "pgd_at"} <= methods


def test_training_doc_lists_every_key():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "TRAINING.md"), encoding="utf-8") as f:
        doc = f.read()
    assert reference_markdown() in doc, ("docs/TRAINING.md's key tables differ from the config fields; regenerate "
                                         "them with jsigr_fast.train.config.reference_markdown()")


def test_ranks_other_than_0_tag_their_error_lines(capsys, tmp_path, monkeypatch):
    """Under torchrun every rank printed the same untagged line. Rank 0's stays as it is; the other
    ranks' lines are tagged, never dropped (a rank-specific failure must show), exit codes as before."""
    import warnings

    from jsigr_fast.train import trainer
    from jsigr_fast.train.errors import DataError

    def no_group(*args, **kwargs):  # these errors come before the process group is joined
        raise AssertionError("setup() must not be reached")

    monkeypatch.setattr(trainer, "setup", no_group)
    bad = tmp_path / "bad.yaml"
    bad.write_text("wieght_decay: 0.1\n")
    runs = [(["--config", str(bad)], "unknown config key 'wieght_decay'"),  # while reading the config
            (["--method", "ir"], "method 'ir' needs a teacher: --teacher CKPT")]  # in the trainer, before setup()
    for rank, world, tag in [("1", "2", "[rank 1] "), ("3", "4", "[rank 3] "), ("0", "2", ""), ("0", "1", "")]:
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", world)
        for argv, fragment in runs:
            assert main(["train", *argv, "--out", str(tmp_path / "run"), *QUIET]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"{tag}jsigr-fast train: error: {fragment}"), err
            assert len(err.strip().splitlines()) == 1, err

    # a failure of one rank only (its node lacks the data): shown, tagged, with its own exit code
    def fails_here(cfg, **kwargs):
        warnings.warn("only this rank warns", RuntimeWarning)
        raise DataError("cannot read dataset 'mnist' at /data on this node")

    monkeypatch.setattr(trainer, "train", fails_here)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--out", str(tmp_path / "run"), *QUIET]) == DataError.exit_code == 2
    assert capsys.readouterr().err.splitlines() == [
        "[rank 1] jsigr-fast train: warning: only this rank warns",
        "[rank 1] jsigr-fast train: error: cannot read dataset 'mnist' at /data on this node"]
    # malformed variables (not torchrun's) leave the lines plain rather than fail while reporting
    monkeypatch.setenv("RANK", "one")
    assert main(["train", "--out", str(tmp_path / "run"), *QUIET]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        "jsigr-fast train: error: cannot read dataset 'mnist' at /data on this node"
