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
    assert len(results) == len(selfcheck.EXACT_MODELS) * len(selfcheck.EXACT_LOSSES)
    assert all(r["passed"] and r["error"] <= 1e-9 and r["tier"] == "exact" for r in results)
    assert record["environment"]["extension"] == "loaded"
    assert f"{len(results)} of {len(results)} checks passed" in text and "FAIL" not in text


def test_a_wrong_batch_norm_kernel_fails_the_check(monkeypatch, capsys):
    # the fused BatchNorm off by one part in a million: the BN models' checks that run it fail, the
    # models without BN pass
    right = ops.batch_norm

    def wrong(*args, **kwargs):
        return right(*args, **kwargs) * (1 + 1e-6)

    monkeypatch.setattr(ops, "batch_norm", wrong)
    assert main(["check", "--device", "cpu", "--quick"]) == 1
    text = capsys.readouterr().out
    failed = {line.split(" | ")[4] for line in text.splitlines() if "**FAIL**" in line}
    assert failed == {"conv_bn_train", "conv_bn_eval", "residual_bn"}, text
    assert "FAILED: cpu/cpu exact J-SIGR projection on conv_bn_train" in text


def test_bad_arguments(tmp_path, capsys):
    if not torch.cuda.is_available():
        assert main(["check", "--device", "cuda"]) == 2
        assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err
    assert main(["check", "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path} is a folder" in capsys.readouterr().err
