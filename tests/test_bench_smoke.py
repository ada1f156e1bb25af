"""Smoke test of bench/bench_epoch.py on a tiny configuration (seconds), the well-formedness of the
records it writes (also of the CPU records committed under bench/results/), and the hand-checked
pieces of the new bench/steps.py methods."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
import bench_epoch  # noqa: E402
import steps  # noqa: E402

CONDITION_KEYS = {"device", "torch", "triton", "threads", "model", "batch", "dtype", "precision", "dataset", "statistic",
                  "steps_timed_per_method", "commit", "uncommitted_changes", "date", "per_epoch_batches", "extrapolated", "channels_last"}
RESULT_KEYS = {"label", "floor_units", "n_timed", "s_per_batch", "stat", "median_s_per_batch", "min_s_per_batch", "p20_s", "p80_s", "s_per_epoch",
               "images_per_s", "x_standard", "x_floor", "pgd_at7_speedup", "pgd_at7_speedup_floor"}


def check_record(record: dict, md: str):
    assert CONDITION_KEYS <= set(record["conditions"]), CONDITION_KEYS - set(record["conditions"])
    res = record["results"]
    assert {"standard", "fgsm_at1", "pgd_at7", "jarn", "jarn_at1", "jsigr"} <= set(res)
    for name, r in res.items():
        assert RESULT_KEYS <= set(r), (name, RESULT_KEYS - set(r))
        assert 0 < r["min_s_per_batch"] <= r["p20_s"] <= r["median_s_per_batch"] <= r["p80_s"]
        assert r["s_per_batch"] == r[f"{r['stat']}_s_per_batch"] and r["stat"] == record["conditions"]["statistic"]
        assert r["s_per_epoch"] == pytest.approx(r["s_per_batch"] * record["conditions"]["per_epoch_batches"])
        assert r["images_per_s"] == pytest.approx(record["conditions"]["batch"] / r["s_per_batch"])
        assert r["x_standard"] == pytest.approx(r["s_per_batch"] / res["standard"]["s_per_batch"])
        assert r["x_floor"] == pytest.approx(r["x_standard"] * 3 / r["floor_units"])
        assert f"| {r['label']} |" in md
    assert res["standard"]["x_standard"] == 1.0 and res["pgd_at7"]["pgd_at7_speedup"] == 1.0
    assert (res["standard"]["floor_units"], res["pgd_at7"]["floor_units"], res["jsigr"]["floor_units"]) == (3, 17, 11)
    assert res["jarn"]["pgd_at7_speedup_jarn_paper"] == pytest.approx(704 / 217)
    assert record["targets"]["jarn"]["need"] == pytest.approx(704 / 217)
    assert "target JARN only" in md


def test_bench_epoch_tiny_config(tmp_path, capsys):
    import matplotlib.image as mpimg

    record, written = bench_epoch.main(["--model", "digits_cnn", "--dataset", "digits", "--batch", "16",
                                        "--batches", "1", "--rounds", "2", "--warmup", "0", "--out", str(tmp_path),
                                        "--tag", "smoke", "--stat", "min"])
    stem = str(tmp_path / "epoch_cpu_digits_cnn_digits_b16_fp32_smoke")
    assert written == [stem + ".json", stem + ".md", stem + ".png"]
    with open(stem + ".json") as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(record))
    with open(stem + ".md") as f:
        md = f.read()
    check_record(on_disk, md)
    assert on_disk["conditions"]["steps_timed_per_method"] == 2
    assert all(r["n_timed"] == 2 for r in on_disk["results"].values())
    assert "extrapolated" in md and "1,344 images" in md  # 84 batches of 16 from 1347 digits
    assert mpimg.imread(stem + ".png").shape[0] > 100
    import jsigr_fast
    assert ("jsigr_fused" in on_disk["results"]) == ("fused" in jsigr_fast.available_backends("cpu"))
    assert "| J-SIGR, projection (reference) |" in capsys.readouterr().out


def test_bench_epoch_graphed_steps(tmp_path, monkeypatch, capsys):
    # --cuda-graph's plumbing on the CPU (a simulated capture): every method is captured at its first batch
    # (untimed; timed batches replay it), JARN's GAN steps read the host, cannot be, and run eagerly
    from jsigr_fast.cuda_graphs import SimulatedGraph

    monkeypatch.setattr(bench_epoch, "GRAPH_FACTORY", SimulatedGraph)
    record, written = bench_epoch.main(["--model", "digits_cnn", "--dataset", "digits", "--batch", "16",
                                        "--batches", "2", "--rounds", "1", "--warmup", "0", "--out", str(tmp_path),
                                        "--methods", "standard,pgd_at7,jarn,jsigr", "--cuda-graph", "--no-plot"])
    assert written[0].endswith("epoch_cpu_digits_cnn_digits_b16_fp32_graphs.json")
    res = record["results"]
    assert record["conditions"]["cuda_graph"] is True
    assert {n: r["cuda_graph"] for n, r in res.items()} == {"standard": True, "pgd_at7": True, "jarn": False,
                                                            "jsigr": True}
    assert res["jarn"]["label"].endswith("(eager: not capturable)") and "failed" in res["jarn"]["graph_error"]
    assert all(r["n_timed"] == 1 for n, r in res.items() if n != "jarn")  # the capture's batch is untimed
    assert res["jarn"]["n_timed"] == 1  # its first batch tried the capture, then ran eagerly: untimed too
    assert "each step replays a CUDA graph" in open(written[1]).read()


def test_bench_epoch_rejects_unknown_method(tmp_path):
    with pytest.raises(SystemExit):
        bench_epoch.main(["--model", "digits_cnn", "--dataset", "digits", "--methods", "standard,nope",
                          "--out", str(tmp_path)])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(BENCH, "results", "epoch_*.json"))))
def test_committed_epoch_records_are_well_formed(path):
    with open(path) as f:
        record = json.load(f)
    with open(path[:-5] + ".md") as f:
        md = f.read()
    check_record(record, md)
    assert os.path.exists(path[:-5] + ".png")


# ----------------------------------------------------------------------------------------------
# the new methods of bench/steps.py, by hand on an affine model
# ----------------------------------------------------------------------------------------------
class Affine(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(16, 4).double()

    def forward(self, x):
        return self.lin(x.flatten(1))


def test_fgsm_at1_times_the_training_clis_fgsm_example():
    # the benchmark's FGSM-AT1 is `--method fgsm_at` (default): one step of 1.25 eps from a uniform
    # random start, every sample. Oracle, by hand for an affine model: the same start u (same
    # generator), then the sign of the CE gradient at x + u, projected onto the ball and [0, 1]
    from jsigr_fast.attacks import pgd
    from jsigr_fast.train.config import TrainConfig

    m = Affine()
    x = torch.rand(6, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (6,))
    methods = steps.make_methods((1, 4, 4), at_eps=0.1)
    loss = methods["fgsm_at1"].loss(m, x, y)
    start = pgd(m, x, y, 0.1, alpha=1e-12, steps=1, random_start=True,
                  generator=torch.Generator().manual_seed(0))  # x + u, to 1e-12
    with torch.no_grad():
        p = torch.softmax(m(start), 1)
        p[torch.arange(6), y] -= 1
        g = (p @ m.lin.weight).reshape(x.shape)
    want = (x + (start + TrainConfig().fgsm_alpha * 0.1 * g.sign() - x).clamp(-0.1, 0.1)).clamp(0, 1)
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(m(want), y).detach()), rel=1e-9)
    assert {"pgd_at7", "fgsm_at1", "jarn", "jarn_at1", "standard", "jsigr"} <= set(methods)
    for name in ("pgd_at7", "jarn", "jarn_at1"):
        out = methods[name].loss(m, x, y)
        assert out.dim() == 0 and out.requires_grad
        out.backward()


def test_bench_probes_tiny_config(tmp_path, capsys):
    import bench_probes

    import jsigr_fast
    from jsigr_fast import fused

    if "fused" not in jsigr_fast.available_backends("cpu"):
        pytest.skip(f"fused backend unavailable: {jsigr_fast.extension_error()}")
    before = dict(fused.BATCH_PROBES)
    bench_probes.main(["--model", "digits_cnn", "--batch", "8", "--n-proj", "1,3", "--rounds", "1", "--repeats", "1",
                       "--out", str(tmp_path)])
    assert fused.BATCH_PROBES == before  # the on/off switch is restored
    stem = tmp_path / "probes_cpu_digits_cnn_b8_float32"
    with open(f"{stem}.json") as f:
        record = json.load(f)
    assert set(record["times"]) == {"(1, 'per-probe')", "(1, 'reference')", "(3, 'per-probe')", "(3, 'batched')",
                                    "(3, 'reference')"}
    assert all(len(v) == 1 and v[0] > 0 for v in record["times"].values())
    md = (tmp_path / "probes_cpu_digits_cnn_b8_float32.md").read_text()
    assert "| 1 | 11 |" in md and "| 3 | 17 |" in md and "nothing to batch" in md
    assert "agree" in capsys.readouterr().out  # the float64 equality check ran before the timing


def test_bench_fd_accuracy_tiny_config(tmp_path):
    import bench_fd_accuracy

    bench_fd_accuracy.main(["--model", "digits_cnn", "--activation", "gelu", "--batch", "8", "--steps", "0.001,0.01",
                            "--out", str(tmp_path)])
    stem = tmp_path / "fd_accuracy_cpu_digits_cnn_gelu_b8"
    with open(f"{stem}.json") as f:
        record = json.load(f)
    rows = record["rows"]
    assert [(r["mode"], r["precision"], r["fd_step"]) for r in rows] == [
        ("exact", "float32", None), ("exact", "bfloat16", None), ("fd", "float32", 0.001), ("fd", "float32", 0.01),
        ("fd", "bfloat16", 0.001), ("fd", "bfloat16", 0.01)]
    exact = rows[0]
    assert all(exact[t + "_rel_err"] == 0 for t in bench_fd_accuracy.TERMS)
    assert exact["input_grad_cos"] == pytest.approx(1.0, abs=1e-12)
    for r in rows:
        for t in bench_fd_accuracy.TERMS:  # each error is the row's value against the exact float32 one
            assert r[t + "_rel_err"] == pytest.approx(r[t] / record["exact"][t] - 1)
    # a smooth network in float32: fd close to exact, in value and in parameter gradient
    assert abs(rows[3]["input_grad_rel_err"]) < 0.05 and rows[3]["input_grad_cos"] > 0.99
    assert (tmp_path / "fd_accuracy_cpu_digits_cnn_gelu_b8.md").read_text().count("\n| fd |") == 4


def test_cpu_step_peak_counts_a_known_allocation():
    # the profiler-based peak against an allocation of known size, live for the whole of the loss,
    # its backward and the optimizer step (freed by a step post-hook): wherever the step's peak is,
    # it grows by exactly that size (an independent count: numel * 4 bytes)
    import bench_memory

    model, opt, x, y = steps.make_setup("digits_cnn", 16, dataset="digits")
    held = []

    def plain(m, xx, yy):
        return F.cross_entropy(m(xx), yy)

    def with_extra(m, xx, yy):
        held.append(torch.ones(8 * 2**20 // 4))  # 8 MiB
        return F.cross_entropy(m(xx), yy)

    steps.train_step(model, opt, plain, x, y)
    base, net = bench_memory.cpu_step_peak(model, opt, plain, x, y)
    hook = opt.register_step_post_hook(lambda *_: held.clear())
    try:
        more, more_net = bench_memory.cpu_step_peak(model, opt, with_extra, x, y)
    finally:
        hook.remove()
    assert not held
    assert base > 0 and abs(net) < 0.05 * base and abs(more_net) < 0.05 * base  # the accounting balances
    assert more - base == pytest.approx(8 * 2**20, rel=0.01)


def test_cpu_step_peak_ignores_stale_sizes_at_reused_addresses():
    # torch's CPU allocator keeps the size of each block allocated under a profiler by address and does
    # not forget it when the block is freed with no profiler running. A block allocated later at that
    # address (outside a profiler) and freed inside one is then reported freed with the stale size:
    # CI once saw the standard step's net at -0.1 MiB this way. Here a step frees such blocks.
    import bench_memory
    from torch.profiler import ProfilerActivity, profile

    model, opt, x, y = steps.make_setup("digits_cnn", 16, dataset="digits")

    def plain(m, xx, yy):
        return F.cross_entropy(m(xx), yy)

    held = []
    for _ in range(10):  # until malloc has reused enough addresses (one round does here: 35 of 50)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
            old = [torch.empty(10_000 + 100 * i) for i in range(50)]  # 40-45 KB each, sizes remembered
        addresses = {t.data_ptr() for t in old}
        del old  # freed with no profiler running: the remembered sizes stay
        fresh = [torch.empty(5_000) for _ in range(400)]  # 20 KB each, allocated with no profiler running
        held += [t for t in fresh if t.data_ptr() in addresses]
        del fresh
        if len(held) >= 10:
            break
    assert len(held) >= 10, "precondition: the allocator reuses freed addresses"

    def frees_stale_blocks(m, xx, yy):
        held.clear()  # each is reported freed with its address's stale 40-45 KB, not its 20 KB
        return F.cross_entropy(m(xx), yy)

    steps.train_step(model, opt, plain, x, y)
    base, _ = bench_memory.cpu_step_peak(model, opt, plain, x, y)
    peak, net = bench_memory.cpu_step_peak(model, opt, frees_stale_blocks, x, y)
    assert not held
    assert abs(net) < 0.05 * base  # the stale frees (> 0.2 MiB together) are not counted
    assert peak == pytest.approx(base, rel=0.05)


def test_bench_memory_tiny_config(tmp_path):
    import bench_memory

    bench_memory.main(["--model", "digits_cnn", "--batch", "16", "--methods", "jsigr,double_backprop",
                       "--out", str(tmp_path)])
    with open(tmp_path / "memory_cpu_digits_cnn_b16_float32.json") as f:
        record = json.load(f)
    rows = record["rows"]
    assert list(rows) == ["standard", "jsigr", "double_backprop"]
    assert rows["standard"]["x_standard"] == 1.0
    assert rows["jsigr"]["peak_bytes"] > rows["double_backprop"]["peak_bytes"] > rows["standard"]["peak_bytes"]
    assert all(abs(r["net_bytes"]) < 0.05 * r["peak_bytes"] for r in rows.values())
    md = (tmp_path / "memory_cpu_digits_cnn_b16_float32.md").read_text()
    assert "| standard CE |" in md and "≤ 2×" in md
    png = (tmp_path / "memory_cpu_digits_cnn_b16_float32.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_bench_memory_with_the_cuda_settings_on_the_cpu(tmp_path):
    # --policies cuda: the fused steps run with the CUDA entries of the per-device settings (there batch norm
    # keeps grad_y, so the default fused step holds what the keep ablation holds, and more than the rebuild),
    # the record says so, and the CPU's settings are back afterwards
    import bench_memory

    from jsigr_fast import fused, ops

    before = (dict(fused.CHANNELS_LAST), dict(ops.BN_REBUILD_GRAD_Y))
    bench_memory.main(["--model", "resnet20", "--batch", "8", "--policies", "cuda", "--methods",
                       "jsigr_fused,jsigr_bn_keep_fused,jsigr_bn_rebuild_fused", "--out", str(tmp_path)])
    assert (dict(fused.CHANNELS_LAST), dict(ops.BN_REBUILD_GRAD_Y)) == before
    with open(tmp_path / "memory_cpu_resnet20_b8_float32_cuda_policies.json") as f:
        record = json.load(f)
    rows = record["rows"]
    assert record["conditions"]["policies"] == "cuda"
    assert rows["jsigr_fused"]["peak_bytes"] == rows["jsigr_bn_keep_fused"]["peak_bytes"]
    assert rows["jsigr_bn_rebuild_fused"]["peak_bytes"] < rows["jsigr_fused"]["peak_bytes"]
    md = (tmp_path / "memory_cpu_resnet20_b8_float32_cuda_policies.md").read_text()
    assert "the fused backend with the CUDA settings." in md
    with pytest.raises(SystemExit):
        bench_memory.main(["--device", "cuda", "--policies", "cuda"])


def test_bench_fd_accuracy_exact_estimator_in_eval_mode(tmp_path):
    import bench_fd_accuracy

    bench_fd_accuracy.main(["--model", "digits_cnn", "--activation", "gelu", "--batch", "4", "--steps", "0.001",
                            "--low", "none", "--exact-jacobian", "--eval-mode", "--out", str(tmp_path)])
    with open(tmp_path / "fd_accuracy_cpu_digits_cnn_gelu_b4_exact_eval.json") as f:
        record = json.load(f)
    assert record["conditions"]["train_mode"] is False
    assert [(r["mode"], r["precision"]) for r in record["rows"]] == [("exact", "float32"), ("fd", "float32")]
    # eval mode, smooth network: the exact-K fd estimate is the exact one up to O(h)
    assert abs(record["rows"][1]["exact_rel_err"]) < 0.01
    assert "| Jacobian, exact |" in (tmp_path / "fd_accuracy_cpu_digits_cnn_gelu_b4_exact_eval.md").read_text()


def test_bench_fd_accuracy_reports_the_refused_exact_estimator(tmp_path):
    import bench_fd_accuracy

    bench_fd_accuracy.main(["--model", "resnet20", "--batch", "2", "--steps", "0.01", "--low", "none",
                            "--exact-jacobian", "--out", str(tmp_path)])
    with open(tmp_path / "fd_accuracy_cpu_resnet20_b2_exact.json") as f:
        fd_row = json.load(f)["rows"][1]
    assert fd_row["exact"] is None and "train-mode BatchNorm couples them" in fd_row["exact_refused"]
    assert fd_row["projection_rel_err"] is not None  # the stochastic estimators still ran
    assert "| refused |" in (tmp_path / "fd_accuracy_cpu_resnet20_b2_exact.md").read_text()


def test_eager_penalty_ablation_is_the_same_loss_with_fewer_graphs_alive(monkeypatch):
    # bench/steps.py's memory ablation against the reference backend's J-SIGR (the oracle) in float64:
    # the same loss value and parameter gradients from the same draws; and, its point, a lower peak
    # than the fused loss's, since only one create_graph VJP is alive at a time
    import copy

    import bench_memory
    import jsigr_fast
    from jsigr_fast.models import get_model

    if "fused" not in jsigr_fast.available_backends("cpu"):
        pytest.fail("the compiled extension is not built (make test builds it)")
    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=10).double().train()
    x = torch.rand(6, 3, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    runs = []
    for fn in (lambda m: jsigr_fast.loss(m, x, y, backend="reference"),
               lambda m: steps.fused_jsigr_eager_penalty(m, x, y)):
        m = copy.deepcopy(model)
        torch.manual_seed(1)
        loss = fn(m)
        runs.append((loss.detach(), torch.autograd.grad(loss, list(m.parameters()))))
    (ref_loss, ref_grads), (loss, grads) = runs
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-8, atol=1e-12)

    # the memory, in float32 at batch 32 with batch norm keeping grad_y as it did when this was measured
    # (0.82x the fused loss's peak; 0.97x if the penalty's VJP graph were kept alive, so the bound below
    # needs it freed, not just the split backward; with the rebuild, both graphs are smaller: 0.94x)
    from jsigr_fast import ops

    monkeypatch.setitem(ops.BN_REBUILD_GRAD_Y, "cpu", False)
    m, opt, x, y = steps.make_setup("resnet20", 32)
    peaks = {}
    for name, fn in (("fused", lambda mm, xx, yy: jsigr_fast.loss(mm, xx, yy, backend="fused")),
                     ("eager", steps.fused_jsigr_eager_penalty)):
        steps.train_step(m, opt, fn, x, y)
        peaks[name], _ = bench_memory.cpu_step_peak(m, opt, fn, x, y)
    assert peaks["eager"] < 0.9 * peaks["fused"], peaks


def test_batch_norm_rebuild_lowers_the_fused_jsigr_peak():
    # ops.BN_REBUILD_GRAD_Y's point, measured as bench_memory measures it: the fused J-SIGR step's peak
    # with batch norm rebuilding grad_y from grad_x vs keeping it (ResNet-20, batch 32, float32;
    # measured 106 vs 149 MiB, 0.72x: one activation-sized tensor per batch norm in each of the two
    # create-graph VJP graphs); the bench methods force the choice, whatever the device's default
    import bench_memory

    m, opt, x, y = steps.make_setup("resnet20", 32)
    methods = steps.make_methods(x.shape[1:])
    peaks = {}
    for name in ("jsigr_bn_keep_fused", "jsigr_bn_rebuild_fused"):
        fn = methods[name].loss
        steps.train_step(m, opt, fn, x, y)
        peaks[name], _ = bench_memory.cpu_step_peak(m, opt, fn, x, y)
    assert peaks["jsigr_bn_rebuild_fused"] < 0.8 * peaks["jsigr_bn_keep_fused"], peaks


def test_bench_fused_tiny_config_with_all_ablations(tmp_path):
    import bench_fused

    bench_fused.main(["--model", "digits_cnn", "--batch", "8", "--pairs", "jsigr,jsigr_fd", "--rounds", "2",
                      "--repeats", "1", "--ablation", "eager", "--ablation", "fd_kept", "--ablation", "fd_rules",
                      "--ablation", "bn_rebuild", "--ablation", "aten_rules", "--ablation", "aten_bn",
                      "--ablation", "python_rules", "--ablation", "rebuild_torch", "--out", str(tmp_path)])
    (path,) = glob.glob(str(tmp_path / "fused_cpu_digits_cnn_b8_float32_t*_jsigr_jsigr_fd_eager_fd_kept_fd_rules"
                                       "_bn_rebuild_aten_rules_aten_bn_python_rules_rebuild_torch.json"))
    with open(path) as f:
        rows = json.load(f)["results"]
    assert list(rows) == ["standard", "jsigr", "jsigr_fused", "jsigr_fd", "jsigr_fd_fused", "jsigr_eager_fused",
                          "jsigr_fd_kept", "jsigr_fd_rules", "jsigr_bn_keep_fused", "jsigr_bn_rebuild_fused",
                          "jsigr_aten_rules_fused", "jsigr_aten_bn_fused", "jsigr_python_rules_fused",
                          "jsigr_bn_rebuild_torch_fused"]
    for n in list(rows)[1:]:
        assert len(rows[n]["rounds_s"]) == 2 and rows[n]["x_standard"] == pytest.approx(
            rows[n]["median_s"] / rows["standard"]["median_s"])
    for ref, fus in (("jsigr", "jsigr_fused"), ("jsigr_fd", "jsigr_fd_fused")):
        assert rows[fus]["speedup_rounds"] == pytest.approx(
            [r / f for r, f in zip(rows[ref]["rounds_s"], rows[fus]["rounds_s"])])
    for abl, base in (("jsigr_eager_fused", "jsigr_fused"), ("jsigr_fd_kept", "jsigr_fd"),
                      ("jsigr_fd_rules", "jsigr_fd_fused"), ("jsigr_bn_rebuild_fused", "jsigr_bn_keep_fused"),
                      ("jsigr_aten_rules_fused", "jsigr_fused"), ("jsigr_aten_bn_fused", "jsigr_fused"),
                      ("jsigr_python_rules_fused", "jsigr_fused"),
                      ("jsigr_bn_rebuild_torch_fused", "jsigr_bn_rebuild_fused")):
        assert rows[abl][f"x_{base}_rounds"] == pytest.approx(
            [e / f for e, f in zip(rows[abl]["rounds_s"], rows[base]["rounds_s"])])
    md = open(path[:-len(".json")] + ".md").read()
    assert "| J-SIGR, projection (fused), penalty gradients eager (ablation) |" in md
    assert "| J-SIGR, fd (reference), perturbed graphs kept (ablation) |" in md
    assert "Ablation 'eager' (the input-gradient penalty's parameter gradients" in md
    assert "Ablation 'fd_kept' (every perturbed forward's graph kept" in md
    assert "Ablation 'fd_rules' (the fused conv / ReLU double-backward rules and the fused batch norm" in md
    assert "Ablation 'aten_rules' (ATen's conv and ReLU autograd in the create-graph passes" in md
    assert "Ablation 'aten_bn' (ATen's batch-norm forward and backward kernels inside the fused" in md
    assert "Ablation 'python_rules' (the conv / ReLU double-backward rules as Python autograd Functions" in md


def test_fd_rules_ablation_is_the_same_loss_through_the_rules(monkeypatch):
    # The fd_rules ablation must time what it says: the fused fd loss, its first-order passes through
    # the conv / ReLU rules (which the library's default skips there), with the switch restored.
    import jsigr_fast
    from jsigr_fast import fused

    calls = []
    orig = fused._conv_rule
    monkeypatch.setattr(fused, "_conv_rule", lambda *a: calls.append(1) or orig(*a))
    m, _, x, y = steps.make_setup("digits_cnn", 4, dtype=torch.float64)
    torch.manual_seed(0)
    ablation = steps._fd_fused_rules(m, x, y)
    assert calls and fused.FIRST_ORDER_NATIVE
    del calls[:]
    torch.manual_seed(0)
    default = jsigr_fast.loss(m, x, y, mode="fd", backend="fused")
    assert not calls
    torch.testing.assert_close(ablation, default, rtol=1e-12, atol=0)


def test_bench_fused_ablation_needs_its_pair(capsys):
    import bench_fused

    with pytest.raises(SystemExit):
        bench_fused.main(["--model", "digits_cnn", "--batch", "8", "--pairs", "double_backprop", "--ablation", "eager"])
    assert "--ablation eager is timed against jsigr_fused: include the pair that has it" in capsys.readouterr().err


def test_fd_step_peak_is_about_two_standard_steps():
    # mode="fd" differentiates each perturbed forward's graph as soon as its term is computed
    # (jsigr_fast.finite_difference._free_early), so the step holds the forward's graph and one
    # perturbed graph at a time. ResNet-20, batch 32, float32, measured: 2.02x the standard step's
    # peak (2.99x with every graph kept to the end of the loss call, which fails this).
    import bench_memory
    import jsigr_fast

    m, opt, x, y = steps.make_setup("resnet20", 32)
    peaks = {}
    for name, fn in (("standard", lambda mm, xx, yy: F.cross_entropy(mm(xx), yy)),
                     ("fd", lambda mm, xx, yy: jsigr_fast.loss(mm, xx, yy, mode="fd", backend="reference"))):
        steps.train_step(m, opt, fn, x, y)
        peaks[name], _ = bench_memory.cpu_step_peak(m, opt, fn, x, y)
    assert peaks["fd"] < 2.2 * peaks["standard"], peaks


def _same_as_reference(fused_loss, mode=None):
    """The reference backend's J-SIGR loss and parameter gradients (the oracle) against ``fused_loss``'s on a
    float64 ResNet-20 at 8x8 pixels, same draws; ``mode``: a dispatch mode class both run under, whose
    instance from the fused run is returned with the (model, x, y) used."""
    import copy

    import jsigr_fast

    torch.manual_seed(0)
    model = steps.get_model("resnet20", num_classes=10).double().train()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (4,))
    runs = []
    for fn in (lambda m: jsigr_fast.loss(m, x, y, backend="reference"), lambda m: fused_loss(m, x, y)):
        m = copy.deepcopy(model)
        torch.manual_seed(1)
        with mode() if mode else contextlib.nullcontext() as seen:
            loss = fn(m)
            grads = torch.autograd.grad(loss, list(m.parameters()))
        runs.append((loss.detach(), grads, seen))
    (ref_loss, ref_grads, _), (loss, grads, seen) = runs
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-8, atol=1e-12)
    return seen, (model, x, y)


def test_aten_rules_ablation_is_the_same_loss_through_aten(monkeypatch):
    # The aten_rules ablation must time what it says: the fused J-SIGR loss with no conv / ReLU rule applied
    # (ATen's autograd there, batch norm still fused), the same loss and parameter gradients as the
    # reference backend's (the oracle, float64), and fused.LAYER_RULES restored afterwards.
    import copy

    import jsigr_fast
    from jsigr_fast import fused

    calls = []
    for name in ("_conv_rule", "_relu_rule"):
        orig = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, orig=orig: calls.append(1) or orig(*a))
    bn_calls = []
    orig_bn = jsigr_fast.ops.BatchNormTrain.apply
    monkeypatch.setattr(jsigr_fast.ops.BatchNormTrain, "apply", lambda *a: bn_calls.append(1) or orig_bn(*a))
    before = dict(fused.LAYER_RULES)
    _, (model, x, y) = _same_as_reference(steps._fused_jsigr_aten_layers)
    assert not calls and bn_calls and fused.LAYER_RULES == before
    # and the default fused loss does apply the rules
    torch.manual_seed(1)
    jsigr_fast.loss(copy.deepcopy(model), x, y, backend="fused")
    assert calls


def test_bench_overhead_counts_python_calls_ops_and_syncs():
    # count_step's counters against steps whose counts are known
    import bench_overhead

    def helper():
        return 1

    def step():
        for _ in range(7):
            helper()
        t = torch.ones(3) * 2  # one aten op
        float(t.sum())  # sum + one host read

    c = bench_overhead.count_step(step)
    assert c["python_calls"] >= 8 and c["python_calls"] < 40, c  # step + 7 helpers (+ a few in torch's Python)
    assert c["aten_ops"] == 4 and c["host_syncs"] == 1, c  # ones, mul, sum and the read itself
    x = torch.randn(3, requires_grad=True)
    c = bench_overhead.count_step(lambda: ((x * 2).sum()).backward())
    assert c["autograd_nodes"] == 3, c  # SumBackward0, MulBackward0, AccumulateGrad


def test_bench_overhead_tiny_config(tmp_path):
    import bench_overhead
    from jsigr_fast import fused, ops

    before = [dict(getattr(mod, name)) for mod, name in bench_overhead.POLICIES]
    settings = (torch.get_num_threads(), torch.backends.mkldnn.enabled)
    record = bench_overhead.main(["--methods", "standard,jsigr,jsigr_fused", "--rounds", "1", "--repeats", "1",
                                  "--policies", "cuda", "--out", str(tmp_path)])
    # restored: the policies, and the thread count and oneDNN switch (later tests compare bit for bit
    # against subprocesses that run with torch's defaults)
    assert [dict(getattr(mod, name)) for mod, name in bench_overhead.POLICIES] == before
    assert (torch.get_num_threads(), torch.backends.mkldnn.enabled) == settings
    rows = record["rows"]
    assert list(rows) == ["standard", "jsigr", "jsigr_fused"]
    for r in rows.values():
        assert r["ms"] > 0 and r["python_calls"] > 0 and r["aten_ops"] > 0 and r["autograd_nodes"] > 0
    # the fused step dispatches fewer aten ops than the reference (its batch-norm double backward is one op)
    assert rows["jsigr_fused"]["aten_ops"] < rows["jsigr"]["aten_ops"] / 2
    md = open(tmp_path / "overhead_cpu_resnet20_cuda_policies.md").read()
    assert "| J-SIGR, projection (fused) |" in md and "the CUDA policies" in md
    with open(tmp_path / "overhead_cpu_resnet20_cuda_policies.json") as f:
        assert json.load(f)["rows"]["standard"]["aten_ops"] == rows["standard"]["aten_ops"]
    assert fused.CHANNELS_LAST["cpu"] is True and ops.BN_REBUILD_GRAD_Y["cpu"] is True


def test_aten_bn_ablation_is_the_same_loss_with_atens_kernels():
    # The aten_bn ablation: the fused J-SIGR loss with ATen's batch-norm forward / backward inside the fused
    # ops (they ran), the fused double backward kept; the loss and parameter gradients of the reference
    # backend (the oracle, float64); ops.ATEN_BN_KERNELS restored.
    from oracles import DispatchedOps

    from jsigr_fast import ops

    before = dict(ops.ATEN_BN_KERNELS)
    seen, _ = _same_as_reference(steps._fused_jsigr_aten_bn, mode=DispatchedOps)
    assert ops.ATEN_BN_KERNELS == before
    # (the final backward's batch-norm calls that carry cotangents of the statistics, from the double
    # backward, still run the fused backward kernel: ATen's has no such terms)
    assert {"aten.native_batch_norm.default", "aten.native_batch_norm_backward.default"} <= set(seen.names)
    # the fused double backward: given grad_y, or (where the rebuild is on, as on the CPU) given the outputs
    assert {"jsigr_fast.batch_norm_double_backward.default",
            "jsigr_fast.batch_norm_double_backward_from_grad_x.default"} & set(seen.names)
    assert "jsigr_fast.batch_norm_train.default" not in seen.names


def test_python_rules_ablation_is_the_same_loss_through_the_python_functions(monkeypatch):
    # The python_rules ablation: the fused J-SIGR loss with the conv / ReLU rules as the Python autograd
    # Functions (they ran), the reference backend's loss and parameter gradients (the oracle, float64), and
    # fused.CPP_RULES restored; the default applies the C++ ones (no Python rule Function), where built.
    import copy

    import jsigr_fast
    from jsigr_fast import fused

    calls = []
    for cls in (fused._Conv2d, fused._ReLU):
        orig = cls.apply
        monkeypatch.setattr(cls, "apply", lambda *a, orig=orig: calls.append(1) or orig(*a))
    before = dict(fused.CPP_RULES)
    _, (model, x, y) = _same_as_reference(steps._fused_jsigr_python_rules)
    assert calls and fused.CPP_RULES == before
    del calls[:]
    torch.manual_seed(1)
    jsigr_fast.loss(copy.deepcopy(model), x, y, backend="fused")
    assert (not calls) == fused._CPP_RULES_BUILT


def test_rebuild_torch_ablation_is_the_same_loss_through_the_torch_rebuild(monkeypatch):
    # The rebuild_torch ablation: the fused J-SIGR loss with grad_y rebuilt by torch ops (ops.rebuild_grad_y ran)
    # and passed to the double backward given grad_y, not the op that takes grad_x; the reference backend's loss
    # and parameter gradients (the oracle, float64); both settings restored.
    from oracles import DispatchedOps

    from jsigr_fast import ops

    calls = []
    real = ops.rebuild_grad_y
    monkeypatch.setattr(ops, "rebuild_grad_y", lambda *a, **k: calls.append(1) or real(*a, **k))
    before = (dict(ops.BN_REBUILD_GRAD_Y), dict(ops.BN_DOUBLE_BACKWARD_FROM_GRAD_X))
    seen, _ = _same_as_reference(steps._fused_jsigr_rebuild_torch, mode=DispatchedOps)
    assert (dict(ops.BN_REBUILD_GRAD_Y), dict(ops.BN_DOUBLE_BACKWARD_FROM_GRAD_X)) == before
    assert calls and "jsigr_fast.batch_norm_double_backward.default" in seen.names
    assert "jsigr_fast.batch_norm_double_backward_from_grad_x.default" not in seen.names
    del calls[:]
    seen, _ = _same_as_reference(steps._fused_jsigr_bn_rebuild(True), mode=DispatchedOps)
    assert not calls and "jsigr_fast.batch_norm_double_backward_from_grad_x.default" in seen.names


def test_profile_lines_give_the_gpus_busy_share():
    # bench_fused --profile on a GPU: kernel time against the unprofiled step and the profiled one (the
    # numbers a GPU run feeds in, checked here by hand: 12 ms of kernels in a 40 ms step is 30 %)
    import bench_step

    top = {"autograd_nodes": [("X", 0.5)], "aten_self": [("aten::y", 0.25)], "device_ms": 12.0, "kernels": 1400,
           "profiled_wall_ms": 80.0}
    text = "\n".join(bench_step.format_top_ops(top, "the fused step", 40.0))
    assert "- node `X`: 50.0 %" in text and "- op `aten::y`: 25.0 %" in text
    assert ("GPU kernels and copies: 12.0 ms in 1400 of them, 30 % of the 40.0 ms step; 15 % of the profiled "
            "step's 80.0 ms.") in text
    cpu = "\n".join(bench_step.format_top_ops({"autograd_nodes": [], "aten_self": []}, "the step"))
    assert "GPU" not in cpu  # a CPU profile has no device events


def test_graphed_step_timing_and_table():
    # bench_step --cuda-graph's pieces on the CPU: the timing loop with a simulated capture (the real one
    # needs a GPU), a step that cannot be captured, and the table by hand
    import bench_step

    from jsigr_fast.cuda_graphs import SimulatedGraph

    class Refuses(SimulatedGraph):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    model, opt, x, y = steps.make_setup("digits_cnn", 4, dataset="digits")
    loss = steps.make_methods(model.input_shape)["double_backprop_fused"].loss
    r = steps.time_graphed_steps(model, opt, loss, x, y, repeats=3, _graph_factory=SimulatedGraph)
    assert r["repeats"] == 3 and 0 < r["p20_s"] <= r["median_s"] <= r["p80_s"]
    bad = steps.time_graphed_steps(model, opt, loss, x, y, _graph_factory=Refuses)
    assert bad == {"error": "capturing the training step as a CUDA graph failed (RuntimeError: operation not "
                            "permitted when stream is capturing)"}

    results = {"standard": {"label": "standard CE", "median_s": 0.008, "floor_units": 3,
                            "graph": {"median_s": 0.002, "p20_s": 0.002, "p80_s": 0.003}},
               "jsigr_fused": {"label": "J-SIGR (fused)", "median_s": 0.05, "floor_units": 11,
                               "graph": {"median_s": 0.011, "p20_s": 0.010, "p80_s": 0.012}},
               "pgd_at7": {"label": "PGD-AT7", "median_s": 0.04, "floor_units": 17, "graph": bad}}
    for rr in results.values():  # what main() adds
        g = rr["graph"]
        if "median_s" in g:
            g["x_standard"] = g["median_s"] / 0.002
            g["x_floor"] = g["median_s"] / (0.002 * rr["floor_units"] / 3)
            g["speedup_vs_eager"] = rr["median_s"] / g["median_s"]
    text = "\n".join(bench_step.graph_table(results))
    assert "| J-SIGR (fused) | 11.0 [10–12] | 5.50 | 1.50 | 4.55x |" in text  # 11/2, 11/(2*11/3), 50/11
    assert "| PGD-AT7 | not capturable: capturing the training step as a CUDA graph failed" in text
