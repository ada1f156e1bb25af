"""Independent oracles for the tests: written from the definitions with nothing but
``torch.autograd.grad`` loops (or ``torch.func``), and never calling jsigr_fast's own code.

All oracles work on a deep copy of the model, so BatchNorm running statistics of the model under
test are never touched by them.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode


def batch_jacobian(model, x):
    """Full batch Jacobian ``dZ/dX`` as an ``(N, K, N, D)`` tensor: one VJP per (sample, class) output."""
    m = copy.deepcopy(model)
    xg = x.detach().clone().requires_grad_(True)
    z = m(xg)
    n, k = z.shape
    out = torch.zeros(n, k, n, x[0].numel(), dtype=x.dtype)
    for i in range(n):
        for c in range(k):
            (g,) = torch.autograd.grad(z[i, c], xg, retain_graph=True)
            out[i, c] = g.reshape(n, -1)
    return out


def per_sample_jacobian_func(model, x):
    """``(N, K, D)`` per-sample Jacobians by torch.func.jacrev on one sample at a time (sample-independent models)."""
    m = copy.deepcopy(model)
    params = {k: v.detach() for k, v in m.named_parameters()}
    buffers = {k: v.detach() for k, v in m.named_buffers()}

    def f(xi):
        return torch.func.functional_call(m, (params, buffers), (xi.unsqueeze(0),)).squeeze(0)

    jac = torch.func.vmap(torch.func.jacrev(f))(x.detach())
    return jac.reshape(x.shape[0], -1, x[0].numel())


def frobenius_per_sample(J):
    """From the batch Jacobian: ``s_n = sum_m ||J_mn||_F^2`` (column blocks) -> (N,)."""
    return J.pow(2).sum(dim=(0, 1, 3))


def diag_blocks(J):
    n = J.shape[0]
    return torch.stack([J[i, :, i, :] for i in range(n)])  # (N, K, D)


def per_sample_input_gradients(model, x, y):
    """``grad_{x_n} l_n`` one sample at a time with the rest of the batch held fixed."""
    m = copy.deepcopy(model)
    grads = []
    for i in range(x.shape[0]):
        xg = x.detach().clone().requires_grad_(True)
        z = m(xg)
        (g,) = torch.autograd.grad(F.cross_entropy(z[i:i + 1], y[i:i + 1], reduction="sum"), xg)
        grads.append(g[i])
    return torch.stack(grads)


def batch_input_gradient(model, x, y):
    """Row n of ``J^T r`` with ``r_m = softmax(z_m) - onehot(y_m)``, from the full batch Jacobian."""
    J = batch_jacobian(model, x)
    with torch.no_grad():
        z = copy.deepcopy(model)(x)
        r = torch.softmax(z, dim=1) - F.one_hot(y, z.shape[1]).to(z.dtype)
    return torch.einsum("mk,mknd->nd", r, J).reshape(x.shape)


def directional_fd(fn, params, direction, h=1e-6):
    """Central difference of ``fn()`` along ``direction`` (a list shaped like params), float64."""
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(h * d)
        plus = float(fn())
        for p, d in zip(params, direction):
            p.sub_(2 * h * d)
        minus = float(fn())
        for p, d in zip(params, direction):
            p.add_(h * d)
    return (plus - minus) / (2 * h)


def random_direction(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


def graph_nodes(t) -> list:
    """Every autograd node reachable from ``t.grad_fn`` (a custom Function's node is its ctx)."""
    seen, stack, nodes = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(nxt for nxt, _ in node.next_functions)
    return nodes


def graph_node_names(t):
    """Class names of every autograd node reachable from ``t.grad_fn`` (which ops a graph recorded)."""
    return {type(node).__name__ for node in graph_nodes(t)}


def fd_penalty(model, x, h, *, y=None, v=None, zeta=None):
    """mode="fd"'s penalties written out with plain autograd, every graph kept to the caller's
    autograd.grad: the input-gradient penalty (y given), the projection term (v given) or the
    Hutchinson term (zeta given), each a batch mean. The directions are detached, as fd defines
    them; the value is differentiable in the parameters, and in x when x requires grad."""
    n = x.shape[0]
    expand = (-1,) + (1,) * (x.dim() - 1)
    xg = x if x.requires_grad else x.detach().requires_grad_(True)
    logits = model(xg)
    if y is not None:
        per = F.cross_entropy(logits, y, reduction="none")
        (g,) = torch.autograd.grad(per.sum(), xg, retain_graph=True)
        d = g / g.reshape(n, -1).norm(dim=1).view(expand)
        plus = F.cross_entropy(model(x + h * d), y, reduction="none")
        return ((plus - per) / h).pow(2).mean()
    if v is not None:
        (u,) = torch.autograd.grad(logits, xg, v, retain_graph=True)
        d = u / u.reshape(n, -1).norm(dim=1).view(expand)
        return (v.shape[1] * (((model(x + h * d) - logits) * v).sum(1) / h).pow(2)).mean()
    sq = zeta.reshape(n, -1).pow(2).sum(1)
    d = zeta / sq.sqrt().view(expand)
    return (sq * ((model(x + h * d) - logits) / h).reshape(n, -1).pow(2).sum(1)).mean()


class DispatchedOps(TorchDispatchMode):
    """Inside the block, ``names``: every op dispatched, in order (``"aten.add.Tensor"``, ...); ``reads``: how
    many of them read a value to the host (``.item()``, ``bool(tensor)``: a device sync on a GPU)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))

    @property
    def reads(self) -> int:
        return self.names.count("aten._local_scalar_dense.default")

