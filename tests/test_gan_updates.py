"""SaliencyGAN's update rules: deferred commit, non-finite steps skipped, gradients averaged over ranks."""
import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import jsigr_fast
from jsigr_fast.testing import tiny_input, tiny_model

Y = torch.tensor([0, 1, 2, 3, 0])


@pytest.mark.parametrize("cls", [jsigr_fast.JSIGR, jsigr_fast.JARN])
def test_deferred_step_equals_immediate_step(cls):
    model, x = tiny_model("conv_tanh"), tiny_input("conv_tanh")
    now = cls((2, 6, 6), discriminator=(4, 8), disc_every=2).double()
    later = cls((2, 6, 6), discriminator=(4, 8), disc_every=2, auto_step=False).double()
    later.load_state_dict(now.state_dict())
    for s in range(3):
        a = now(model, x, Y, generator=torch.Generator().manual_seed(s))
        before = copy.deepcopy(later.state_dict())
        b = later(model, x, Y, generator=torch.Generator().manual_seed(s))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        with pytest.warns(RuntimeWarning, match="pending adaptor/discriminator update is not saved"):
            pending = later.state_dict()
        for k, v in pending.items():  # nothing moved before step()
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, before[k]), k
        later.step()
        assert later.step() == {}  # a second commit is a no-op
    for (k, u), v in zip(now.state_dict().items(), later.state_dict().values()):
        if isinstance(u, torch.Tensor):
            assert torch.equal(u, v), k
    assert now.gan.steps == later.gan.steps == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [jsigr_fast.JSIGR, jsigr_fast.JARN])
def test_deferred_step_after_autocast(cls, dtype):
    # the trainer's pattern under --amp: the loss under autocast, the commit after it, outside. The
    # adaptor's map was staged in bf16/fp16 and the float32 discriminator step failed on it
    model, x = tiny_model("conv_tanh", dtype=torch.float32), tiny_input("conv_tanh", dtype=torch.float32)
    crit = cls((2, 6, 6), discriminator=(4, 8), disc_every=1, auto_step=False)
    before = [p.detach().clone() for p in crit.discriminator.parameters()]
    with torch.autocast("cpu", dtype=dtype):
        loss = crit(model, x, Y, generator=torch.Generator().manual_seed(0))
    loss.backward()
    terms = crit.step()
    assert "disc" in terms and torch.isfinite(terms["disc"])
    assert any(not torch.equal(p, b) for p, b in zip(crit.discriminator.parameters(), before))


@pytest.mark.parametrize("cls", [jsigr_fast.JSIGR, jsigr_fast.JARN])
def test_a_second_call_before_step_replaces_the_pending_update(cls):
    # the trainer's way of rejecting a step: call again without step(); only the last call commits
    model, x = tiny_model("conv_tanh"), tiny_input("conv_tanh")
    once = cls((2, 6, 6), discriminator=(4, 8), disc_every=1).double()
    twice = cls((2, 6, 6), discriminator=(4, 8), disc_every=1, auto_step=False).double()
    twice.load_state_dict(once.state_dict())
    twice(model, x + 0.5, Y, generator=torch.Generator().manual_seed(1))  # rejected
    twice(model, x, Y, generator=torch.Generator().manual_seed(0))
    twice.step()
    once(model, x, Y, generator=torch.Generator().manual_seed(0))
    assert once.gan.steps == twice.gan.steps == 1
    for (k, u), v in zip(once.state_dict().items(), twice.state_dict().values()):
        if isinstance(u, torch.Tensor):
            assert torch.equal(u, v), k


def test_step_adaptor_refuses_gradients_that_do_not_match_the_parameters():
    gan = jsigr_fast.SaliencyGAN((2, 6, 6), discriminator=(4,)).double()
    params = list(gan.adaptor.parameters())
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=rf"grads: expected {len(params)} tensors shaped like the parameters"):
        gan.step_adaptor([torch.ones_like(p) for p in params][:-1])  # zip stepped the others silently
    with pytest.raises(ValueError, match="grads: expected"):
        gan.step_adaptor([torch.ones(3, dtype=torch.float64)] + [torch.ones_like(p) for p in params[1:]])
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and gan.adaptor_opt.state_dict()["state"] == {}


def test_loading_a_live_state_dict_shares_no_optimizer_state():
    # Optimizer.load_state_dict keeps same-device tensors by reference: the copy's Adam moments and
    # step counters were the original's, so stepping one advanced the other
    a = jsigr_fast.SaliencyGAN((2, 6, 6), discriminator=(4,)).double()
    a.step_adaptor([torch.ones_like(p) for p in a.adaptor.parameters()])
    b = jsigr_fast.SaliencyGAN((2, 6, 6), discriminator=(4,)).double()
    b.load_state_dict(a.state_dict())
    saved = copy.deepcopy(b.adaptor_opt.state_dict()["state"])
    a.step_adaptor([torch.full_like(p, -3.0) for p in a.adaptor.parameters()])
    for i, st in b.adaptor_opt.state_dict()["state"].items():
        for k, v in st.items():
            assert torch.equal(v, saved[i][k]), (i, k)
    assert int(saved[0]["step"]) == 1


def test_non_finite_gradient_skips_the_step_entirely():
    gan = jsigr_fast.SaliencyGAN((2, 6, 6), discriminator=(4,)).double()
    params = list(gan.adaptor.parameters())
    good = [torch.ones_like(p) for p in params]
    assert gan.step_adaptor(good)
    state_before = copy.deepcopy(gan.adaptor_opt.state_dict())
    weights_before = [p.detach().clone() for p in params]
    bad = [g.clone() for g in good]
    bad[0][0, 0, 0, 0] = float("nan")
    assert not gan.step_adaptor(bad)
    assert gan.skipped_steps == 1
    assert all(torch.equal(p, w) for p, w in zip(params, weights_before))
    assert int(gan.adaptor_opt.state_dict()["state"][0]["step"]) == int(state_before["state"][0]["step"]) == 1


def _rank_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        gan = jsigr_fast.SaliencyGAN((2, 6, 6), discriminator=(4,)).double()
        # Opposite signs on the two ranks (Adam's first step is ~ -lr * sign(g), so only signs show):
        # rank 0 sees +1x, rank 1 sees -3x, the average is -1x; unsynchronised, rank 0 would step the other way.
        scale = 1.0 if rank == 0 else -3.0
        grads = [torch.full_like(p, scale) * (i + 1) for i, p in enumerate(gan.adaptor.parameters())]
        gan.step_adaptor(grads)
        torch.save({k: v for k, v in gan.adaptor.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gradients_are_averaged_over_ranks():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        r0 = torch.load(os.path.join(tmp, "rank0.pt"), weights_only=True)
        r1 = torch.load(os.path.join(tmp, "rank1.pt"), weights_only=True)
    torch.manual_seed(0)
    single = jsigr_fast.SaliencyGAN((2, 6, 6), discriminator=(4,)).double()
    single.step_adaptor([torch.full_like(p, -1.0) * (i + 1) for i, p in enumerate(single.adaptor.parameters())])
    for k, v in single.adaptor.state_dict().items():
        assert torch.equal(r0[k], r1[k]), k  # the ranks agree...
        torch.testing.assert_close(r0[k], v, rtol=1e-12, atol=1e-15)  # ...on the averaged-gradient step


@pytest.mark.parametrize("cls", [jsigr_fast.JSIGR, jsigr_fast.JARN])
def test_dtype_conversion_after_a_step_carries_the_adam_moments(cls):
    # .double() after training used to leave the adaptor's / discriminator's Adam moments in float32
    # and the next step failed; the oracle: a fresh float64 criterion loaded with the trained state
    # (Optimizer.load_state_dict casts the moments to the parameters' dtype)
    model = tiny_model("conv_tanh", dtype=torch.float32)
    x, gen = tiny_input("conv_tanh", dtype=torch.float32), torch.Generator()
    torch.manual_seed(0)
    crit = cls((2, 6, 6), discriminator=(4,), disc_every=1)
    crit(model, x, Y, generator=gen.manual_seed(1))
    oracle = cls((2, 6, 6), discriminator=(4,), disc_every=1).double()
    oracle.load_state_dict(copy.deepcopy(crit.state_dict()))  # Adam loads its step counters by reference
    crit.double()
    m64 = copy.deepcopy(model).double()
    outs = []
    for c in (crit, oracle):
        torch.manual_seed(3)  # the updates draw from the global generator too
        outs.append(c(m64, x.double(), Y, generator=gen.manual_seed(2)))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=0)
    for a, b in zip(crit.state_dict().values(), oracle.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    for opt in (crit.gan.adaptor_opt, crit.gan.disc_opt):
        assert all(v.dtype == torch.float64 for s in opt.state.values() for k, v in s.items() if k != "step")


def test_jarn_adv_term_is_the_same_with_immediate_and_deferred_steps():
    # return_terms' "adv" is the adversarial loss the call's discriminator saw: taken before the
    # call's own updates, whether auto_step commits them at once or the trainer does later
    torch.manual_seed(0)
    a = jsigr_fast.JARN((2, 6, 6), discriminator=(4,), disc_every=1)
    b = copy.deepcopy(a)
    b.auto_step = False
    model, x = tiny_model("conv_tanh"), tiny_input("conv_tanh")
    a.double(), b.double()
    _, ta = a(copy.deepcopy(model), x, Y, return_terms=True, generator=torch.Generator().manual_seed(1))
    _, tb = b(copy.deepcopy(model), x, Y, return_terms=True, generator=torch.Generator().manual_seed(1))
    tb.update(b.step())
    torch.testing.assert_close(ta["adv"], tb["adv"], rtol=1e-12, atol=0)
    torch.testing.assert_close(ta["adv"], tb["disc"], rtol=1e-12, atol=0)  # the discriminator's loss, same inputs
