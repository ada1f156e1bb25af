"""``jsigr-fast check``: the install self-check passes on a sound build and catches a wrong kernel."""
import json

import pytest
import torch

import jsigr_fast
from jsigr_fast import ops, selfcheck
from jsigr_fast.cli import main

pytestmark = pytest.mark.skipif("fused" not in jsigr_fast.available_backends(),
                                reason=f"fused backend unavailable: {jsigr_fast.extension_error()}")


def test_quick_check_passes_and_writes_json(tmp_path, capsys):
    out = tmp_path / "check.json"
    state = torch.random.get_rng_state()
    assert main(["check", "--device", "cpu", "--quick", "--json", str(out)]) == 0
    assert torch.equal(torch.random.get_rng_state(), state)  # the checks' seeding does not leak
    text = capsys.readouterr().out
    record = json.loads(out.read_text())
    results = record["results"]
    build, exact = results[:1], results[1:]
    assert [(r["device"], r["tier"], r["check"], r["passed"]) for r in build] == [("cpu", "build", "error path", True)]
    assert len(exact) == len(selfcheck.EXACT_MODELS) * len(selfcheck.EXACT_LOSSES)
    assert all(r["passed"] and r["error"] <= 1e-9 and r["tier"] == "exact" for r in exact)
    assert record["environment"]["extension"] == "loaded"
    assert f"{len(results)} of {len(results)} checks passed" in text and "FAIL" not in text


def test_a_wrong_batch_norm_kernel_fails_the_check(monkeypatch, capsys):
    # the fused BatchNorm off by one part in a million: the BN models' checks that run it fail, the
    # models without BN pass
    right = ops.batch_norm_with_stats  # every train-mode route of the fused backend goes through it

    def wrong(*args, **kwargs):
        y, mean, invstd = right(*args, **kwargs)
        return y * (1 + 1e-6), mean, invstd

    monkeypatch.setattr(ops, "batch_norm_with_stats", wrong)
    assert main(["check", "--device", "cpu", "--quick"]) == 1
    text = capsys.readouterr().out
    failed = {line.split(" | ")[4] for line in text.splitlines() if "**FAIL**" in line}
    assert failed == {"conv_bn_train", "conv_bn_eval", "residual_bn", "residual_bn_relu"}, text
    assert "FAILED: cpu/cpu exact J-SIGR projection on conv_bn_train" in text


def test_bad_arguments(tmp_path, capsys):
    if not torch.cuda.is_available():
        assert main(["check", "--device", "cuda"]) == 2
        assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err
    assert main(["check", "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path} is a folder" in capsys.readouterr().err


def test_an_extension_that_crashes_raising_fails_the_build_check(monkeypatch, capsys):
    # an extension built by another toolchain than torch's died formatting its first error message (a GPU
    # image's compiler wrapper): the check reports it, by the signal, instead of dying with it
    monkeypatch.setattr(selfcheck, "_ERROR_PATH_SCRIPT", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert main(["check", "--device", "cpu", "--quick"]) == 1
    text = capsys.readouterr().out
    (row,) = [line for line in text.splitlines() if line.startswith("| cpu | - | build | error path")]
    assert "**FAIL**" in row and "SIGSEGV" in row and "toolchain" in row, row
    assert "FAILED: cpu/- build error path" in text
    assert sum("| ok |" in line for line in text.splitlines()) == len(selfcheck.EXACT_MODELS) * len(
        selfcheck.EXACT_LOSSES)


def test_an_op_that_does_not_raise_fails_the_build_check(monkeypatch):
    monkeypatch.setattr(selfcheck, "_ERROR_PATH_SCRIPT", "import sys; print('no error', sys.argv[1:])")
    (r,) = selfcheck.error_path_results(["cpu"])
    assert not r.passed and "no RuntimeError for a bad argument (exit 0)" in r.detail, r


def test_the_build_check_runs_the_installed_package_in_a_subprocess():
    # the real op on this machine: raises (no crash), in a process of its own
    (r,) = selfcheck.error_path_results(["cpu"])
    assert r.passed and r.tier == "build" and r.detail == "", r


def test_variant_tier_checks_each_candidate_setting_and_catches_a_wrong_one(monkeypatch):
    # every variant exact on a sound build (float64 against the reference), the settings restored; then
    # ATen's batch-norm backward off by one part in a million inside the fused ops: only that variant's
    # checks fail (its forced setting is what routes there)
    from jsigr_fast import fused

    before = (dict(ops.ATEN_BN_KERNELS), dict(ops.BN_REBUILD_GRAD_Y), dict(fused.LAYER_RULES))
    results = []
    selfcheck.variant_tier(torch.device("cpu"), "cpu", results.append)
    assert len(results) == len(selfcheck.VARIANTS) * len(selfcheck.VARIANT_MODELS) * len(selfcheck.VARIANT_LOSSES)
    assert all(r.passed and r.error <= 1e-9 for r in results), [r for r in results if not r.passed]
    assert (dict(ops.ATEN_BN_KERNELS), dict(ops.BN_REBUILD_GRAD_Y), dict(fused.LAYER_RULES)) == before

    right = torch.ops.aten.native_batch_norm_backward

    class Wrong:
        def __call__(self, *args):
            gx, gw, gb = right(*args)
            return gx * (1 + 1e-6), gw, gb

    monkeypatch.setattr(torch.ops.aten, "native_batch_norm_backward", Wrong())
    results = []
    selfcheck.variant_tier(torch.device("cpu"), "cpu", results.append)
    failed = {r.check.split(", ", 1)[1] for r in results if not r.passed}
    assert failed == {"ATen batch-norm kernels"}, [(r.check, r.model, r.error) for r in results]
