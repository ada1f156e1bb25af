"""Independent oracles of the loss-head ops (per-sample CE and its cotangent ``softmax - onehot``), shared
by tests/test_loss_head.py (the C++ / CUDA ops) and tests/test_triton_loss_head.py (the Triton kernels):
plain Python float64 per row (max shift, math.fsum of the exponentials, logs), and explicit Jacobians
written from the softmax derivative ``d p_k / d z_j = p_k (delta_kj - p_j)``; never from the library.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
UNIT = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _softmax_row(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = math.fsum(e)
    return m, s, [v / s for v in e]


def _ce_oracle(z, y):
    """(loss [N], cot [N, K]) in float64 from the exact values of z."""
    zv = z.detach().double().tolist()
    yv = y.long().tolist()
    loss, cot = [], []
    for row, t in zip(zv, yv):
        m, s, p = _softmax_row(row)
        loss.append(math.log(s) - (row[t] - m))  # logsumexp - z_t, without cancellation at large |z|
        cot.append([pk - (1.0 if k == t else 0.0) for k, pk in enumerate(p)])
    return np.array(loss), np.array(cot).reshape(len(zv), -1)


def _vjp_oracle(z, y, a, b):
    """grad_z of sum_n a_n loss_n + sum_nk b_nk cot_nk from the explicit Jacobians (a or b None: zero)."""
    zv = z.detach().double().tolist()
    N, K = len(zv), z.shape[1]
    out = np.zeros((N, K))
    for n in range(N):
        _, _, p = _softmax_row(zv[n])
        p = np.array(p)
        t = int(y[n])
        onehot = np.eye(K)[t]
        J_loss = p - onehot  # d loss / d z_j
        J_cot = np.diag(p) - np.outer(p, p)  # [k, j] = d cot_k / d z_j (onehot is constant)
        if a is not None:
            out[n] += float(a[n]) * J_loss
        if b is not None:
            out[n] += b[n].double().numpy() @ J_cot
    return out


def _logits(N, K, dtype, seed, scale=3.0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(N, K, generator=gen, dtype=torch.float64) * scale + offset
    y = torch.randint(0, K, (N,), generator=gen)
    return z.to(dtype), y


def _tols(dtype):
    # float64 / float32: the accuracy of a max-shifted evaluation; bfloat16 / float16: computed in
    # float and rounded once to the dtype
    return {torch.float64: dict(rtol=1e-12, atol=1e-13), torch.float32: dict(rtol=2e-6, atol=2e-6),
            torch.bfloat16: dict(rtol=2 * UNIT[torch.bfloat16], atol=1e-5),
            torch.float16: dict(rtol=2 * UNIT[torch.float16], atol=1e-6)}[dtype]


def check_special_values(ce):
    """``ce(logits, target) -> (loss, cot)`` on rows with -inf, +inf, NaN and huge logits, against ATen's
    ``F.cross_entropy`` / ``softmax`` in float64 of the same (rounded) logits: a -inf logit is a class
    of probability 0 (loss +inf when it is the target); +inf or NaN in a row makes the row NaN."""
    inf, nan = float("inf"), float("nan")
    rows = [[0.5, -inf, 1.0, 2.0], [0.5, -inf, 1.0, 2.0], [0.5, inf, 1.0, 2.0], [0.5, nan, 1.0, 2.0],
            [-inf, -inf, -inf, -inf], [1e30, -1e30, 0.0, 1e30]]
    targets = [0, 1, 2, 3, 0, 1]
    # each row twice more at width 12, the four values at columns 0..3 and at 8..11 (the vector lanes of
    # a CPU kernel past its first 8 logits), the other columns finite
    wide = []
    for row in rows:
        for at in (0, 8):
            w = [0.25 * j - 1.0 for j in range(12)]
            w[at:at + 4] = row
            wide.append(w)
    wide_targets = [t + at for t in targets for at in (0, 8)]
    for z, y in ((torch.tensor(rows, dtype=torch.float64), torch.tensor(targets)),
                 (torch.tensor(wide, dtype=torch.float64), torch.tensor(wide_targets))):
        _check_special_rows(ce, z, y)


def _check_special_rows(ce, z, y):
    K = z.shape[1]
    special = ~torch.isfinite(z).all(1) & ~(z == -float("inf")).any(1)
    for dtype in DTYPES:
        zd = z.to(dtype)  # 1e30 is inf in half: that row is NaN there, in ATen as in the op
        loss, cot = ce(zd, y)
        ref_loss = F.cross_entropy(zd.double(), y, reduction="none")
        ref_cot = torch.softmax(zd.double(), 1) - F.one_hot(y, K).double()
        assert ref_loss.isinf().any() and ref_loss.isnan().any() and ref_cot[special].isnan().all()
        torch.testing.assert_close(loss.double(), ref_loss, equal_nan=True, **_tols(dtype))
        torch.testing.assert_close(cot.double(), ref_cot, equal_nan=True, **_tols(dtype))
