"""The portable (non-AVX2) build of the per-sample kernels (csrc/sample_ops_kernels.h compiled by
sample_ops_cpu_generic.cpp): selective masks, bool-masked squared norm and loss head, checked in a
child process with ATEN_CPU_CAPABILITY=default against plain float64 formulas written here."""
import os
import subprocess
import sys

import pytest

from jsigr_fast import ops

pytestmark = pytest.mark.skipif(not ops.mask_ops_compiled_available("cpu"),
                                reason="the compiled selective-mask ops are not built")

_SCRIPT = r"""
import math, torch, jsigr_fast
assert torch.ops.jsigr_fast.saliency_mask_cpu_isa() == "generic", torch.ops.jsigr_fast.saliency_mask_cpu_isa()
O = torch.ops.jsigr_fast
g = torch.Generator().manual_seed(0)
for dtype in (torch.float64, torch.float32):
    for shape in ((3, 37), (2, 3, 5, 7)):
        x = torch.randn(*shape, generator=g, dtype=dtype)
        n, d = shape[0], x[0].numel()
        flat = x.reshape(n, d).double()
        # gradient saliency, beta rule: |g| / max|g| <= beta, division in the dtype
        M = (x.abs().reshape(n, d) / x.abs().reshape(n, d).amax(1, keepdim=True))
        assert torch.equal(O.gradient_saliency_mask(x, 0.3, None).reshape(n, d), M <= 0.3)
        # quantile rule: the k = d - floor(q d) smallest M per sample, by a sort written here
        q = 0.25
        k = d - int(q * d)
        want = torch.zeros(n, d, dtype=torch.bool)
        for i in range(n):
            t = sorted(M[i].tolist())[k - 1]
            want[i] = M[i] <= t
        assert torch.equal(O.gradient_saliency_mask(x, 0.3, q).reshape(n, d), want)
        assert torch.equal(O.threshold_mask(M.reshape(shape), 0.5, None).reshape(n, d), M <= 0.5)
        # bool-masked squared norm and its backward
        m = torch.rand(*shape, generator=g) < 0.5
        mf = m.reshape(n, d).double()
        want_norm = ((flat * mf) ** 2).sum(1)
        torch.testing.assert_close(O.masked_sq_norm_bool(x, m).double(), want_norm, rtol=1e-5, atol=1e-6)
        go = torch.randn(n, generator=g, dtype=dtype)
        torch.testing.assert_close(O.masked_sq_norm_bool_backward(go, x, m).reshape(n, d).double(),
                                   2 * mf * flat * go.double()[:, None], rtol=1e-5, atol=1e-6)
    # loss head, K = 13 (a vector width plus a tail)
    z = torch.randn(5, 13, generator=g, dtype=dtype) * 4
    y = torch.randint(0, 13, (5,), generator=g)
    loss, cot = O.cross_entropy_cotangent(z, y)
    for i in range(5):
        row = z[i].double().tolist()
        mx = max(row)
        lse = mx + math.log(sum(math.exp(v - mx) for v in row))
        assert abs(float(loss[i]) - (lse - row[int(y[i])])) < 1e-5
        p = [math.exp(v - lse) for v in row]
        for j in range(13):
            assert abs(float(cot[i, j]) - (p[j] - (j == int(y[i])))) < 1e-6
    a, b = torch.randn(5, generator=g, dtype=dtype), torch.randn(5, 13, generator=g, dtype=dtype)
    got = O.cross_entropy_cotangent_backward(a, b, z, y).double()
    p = torch.softmax(z.double(), 1)
    onehot = torch.nn.functional.one_hot(y, 13).double()
    want = a.double()[:, None] * (p - onehot) + p * (b.double() - (p * b.double()).sum(1, keepdim=True))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
print("ok")
"""


def test_generic_sample_kernels_in_subprocess():
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
