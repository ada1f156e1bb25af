"""Inputs of the batch-norm op tests, shared by tests/test_bn_ops.py and tests/test_cuda_emulated.py."""
import torch

# (shape, layout): awkward on purpose — batch 1, odd/prime channel counts, spatial 1x1, (N, C), 3-D, 5-D
CASES = [
    ((3, 5, 4, 7), "contiguous"),
    ((3, 5, 4, 7), "channels_last"),
    ((1, 3, 5, 5), "contiguous"),
    ((1, 3, 5, 5), "channels_last"),
    ((4, 7, 1, 1), "contiguous"),
    ((6, 5), "contiguous"),
    ((2, 3, 37), "contiguous"),
    ((2, 3, 4, 5), "transposed"),
    ((2, 17, 3, 3), "channels_last"),
    ((2, 2, 2, 3, 2), "contiguous"),
    ((2, 2, 2, 3, 2), "channels_last"),
    ((5, 1, 3, 3), "contiguous"),
]


def _layout(t, layout):
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    if layout == "transposed":  # a non-contiguous view with x's logical shape
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t


def _inputs(shape, layout, dtype=torch.float64, seed=0, affine=True):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]

    def rnd(*s, scale=1.0, shift=0.0):
        return (torch.randn(s, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = _layout(rnd(*shape, scale=2.0, shift=3.0), layout)
    return dict(
        x=x, gy=_layout(rnd(*shape), layout), u=_layout(rnd(*shape), layout),
        w=rnd(c, scale=0.5, shift=1.0) if affine else None, b=rnd(c) if affine else None,
        gm=rnd(c).to(acc), gs=rnd(c).to(acc), alpha=rnd(c).to(acc), beta=rnd(c).to(acc))


def _assert_all_close(got, expect, **kw):
    assert len(got) == len(expect)
    for i, (a, e) in enumerate(zip(got, expect)):
        torch.testing.assert_close(a, e, msg=lambda m, i=i: f"output {i}: {m}", **kw)


def check_double_backward_from_grad_x(op, d, mean, invstd, cot, weight, gm, gs):
    """``op`` (a ``batch_norm_double_backward_from_grad_x`` kernel) given the reference backward's outputs for
    ``d["gy"]``, against the closed-form double backward at that grad_y. float64: to 1e-10. Lower precision: the
    op only sees grad_y through its rounded grad_x (and the rounded [C] sums), so the flash-attention rule is
    used, the op's error against the float64 reference at most twice that of the reference run in the same
    dtype (given grad_y itself), plus 1e-6 of the output's scale."""
    from jsigr_fast.reference import batch_norm_backward_ref, batch_norm_double_backward_ref

    gx, gw, gb = batch_norm_backward_ref(d["gy"], d["x"], weight, mean, invstd, gm, gs)
    rest = (d["x"], weight, mean, invstd, gm, gs)
    got = op(*cot, gx, gw, gb, *rest)
    if d["x"].dtype == torch.float64:
        _assert_all_close(got, batch_norm_double_backward_ref(*cot, d["gy"], *rest), rtol=1e-10, atol=1e-10)
        return got
    up = lambda t: None if t is None else t.double()  # noqa: E731
    exact = batch_norm_double_backward_ref(*map(up, cot), up(d["gy"]), *map(up, rest))
    plain = batch_norm_double_backward_ref(*cot, d["gy"], *rest)
    for i, (a, p, e) in enumerate(zip(got, plain, exact)):
        err, base = (a.double() - e).abs().max().item(), (p.double() - e).abs().max().item()
        assert err <= 2 * base + 1e-6 * e.abs().max().item(), f"output {i}: error {err:.3g}, plain {base:.3g}"
    return got
