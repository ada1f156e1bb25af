"""Bad input gets a clear TypeError/ValueError naming the argument, and nothing is mutated."""
import copy

import pytest
import torch
import torch.nn as nn

import jsigr_fast
from jsigr_fast.testing import tiny_input, tiny_model


def _setup():
    model, x = tiny_model("conv_bn_train"), tiny_input("conv_bn_train")
    y = torch.tensor([0, 1, 2, 3, 0])
    return model, x, y


class ThreeD(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(72, 8)

    def forward(self, x):
        return self.lin(x.flatten(1)).view(x.shape[0], 2, 4)


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(72, 4).requires_grad_(False)

    def forward(self, x):
        return self.lin(x.flatten(1))


CASES = [
    # (description, kwargs-modifier, exception, message fragment)
    ("integer x", lambda m, x, y: dict(x=(x * 10).long()), TypeError, "x must be a floating-point tensor"),
    ("NaN in x", lambda m, x, y: dict(x=x.clone().index_put_((torch.tensor([0]),), torch.tensor(float("nan"), dtype=x.dtype))),
     ValueError, "x contains NaN or infinite"),
    ("inf in x", lambda m, x, y: dict(x=torch.where(x > 0.5, torch.inf, x)), ValueError, "x contains NaN or infinite"),
    ("x not a tensor", lambda m, x, y: dict(x=x.tolist()), TypeError, "x must be a torch.Tensor"),
    ("unbatched x", lambda m, x, y: dict(x=x[0, 0, 0]), ValueError, "x must be batched"),
    ("empty batch", lambda m, x, y: dict(x=x[:0], y=y[:0]), ValueError, "empty batch"),
    ("float labels", lambda m, x, y: dict(y=y.double()), TypeError, "y must hold integer class indices"),
    ("one-hot labels", lambda m, x, y: dict(y=torch.nn.functional.one_hot(y, 4)), ValueError, r"y must have shape \(5,\)"),
    ("short labels", lambda m, x, y: dict(y=y[:3]), ValueError, r"y must have shape \(5,\)"),
    ("label too large", lambda m, x, y: dict(y=torch.tensor([0, 1, 2, 3, 4])), ValueError, r"labels must lie in \[0, 4\)"),
    ("negative label", lambda m, x, y: dict(y=torch.tensor([0, -1, 2, 3, 0])), ValueError, r"labels must lie in \[0, 4\)"),
    ("3-D logits", lambda m, x, y: dict(model=ThreeD().double()), ValueError, r"model must return \(N, K\)"),
    ("not a module", lambda m, x, y: dict(model=lambda t: t), TypeError, "model must be a torch.nn.Module"),
    ("no trainable parameters", lambda m, x, y: dict(model=Frozen().double()), ValueError, "no trainable parameters"),
    ("model on another device", lambda m, x, y: dict(model=copy.deepcopy(m).to("meta")), ValueError, "x is on cpu but the model is on meta"),
    ("unknown estimator", lambda m, x, y: dict(jacobian="svd"), ValueError, "jacobian must be one of"),
    ("unknown backend", lambda m, x, y: dict(backend="cuda"), ValueError, "backend must be one of"),
    ("negative lambda", lambda m, x, y: dict(lambda_m=-1.0), ValueError, "lambda_m must be >= 0"),
    ("n_proj zero", lambda m, x, y: dict(n_proj=0), ValueError, "n_proj must be >= 1"),
    ("n_proj float", lambda m, x, y: dict(n_proj=1.5), TypeError, "n_proj must be an int"),
    ("quantile > 1", lambda m, x, y: dict(mask_quantile=1.5), ValueError, "mask_quantile must be <= 1"),
    ("nan beta", lambda m, x, y: dict(beta=float("nan")), ValueError, "beta must be finite"),
    ("saliency wrong shape", lambda m, x, y: dict(saliency=torch.zeros(5, 2)), ValueError, "saliency must have x's shape"),
    ("saliency bad string", lambda m, x, y: dict(saliency="adaptor"), ValueError, "saliency must be"),
    ("generator wrong type", lambda m, x, y: dict(generator=0), TypeError, "generator must be a torch.Generator"),
    # int32 labels passed the checks and failed inside F.cross_entropy
    ("int32 labels", lambda m, x, y: dict(y=y.int()), TypeError, r"y must hold class indices as torch.long .* y.long\(\)"),
    # checked whatever lambda_m is (it was only checked when the term was on)
    ("saliency bad string, term off", lambda m, x, y: dict(saliency="bogus", lambda_m=0.0), ValueError,
     "saliency must be"),
    ("saliency complex", lambda m, x, y: dict(saliency=torch.zeros(x.shape, dtype=torch.complex128)), TypeError,
     "saliency must be a real-valued map"),
    ("saliency NaN", lambda m, x, y: dict(saliency=torch.full(x.shape, float("nan"), dtype=x.dtype)), ValueError,
     "saliency contains NaN"),
    ("saliency on another device", lambda m, x, y: dict(saliency=torch.zeros(x.shape, device="meta")), ValueError,
     "saliency is on meta but x is on cpu"),
    ("inference tensor x", lambda m, x, y: dict(x=_inference_copy(x)), ValueError, "x is an inference tensor"),
]


def _inference_copy(x):
    with torch.inference_mode():
        return x.clone()


@pytest.mark.parametrize("desc,modify,exc,msg", CASES, ids=[c[0] for c in CASES])
def test_loss_rejects_bad_input_without_mutation(desc, modify, exc, msg):
    model, x, y = _setup()
    args = dict(model=model, x=x, y=y)
    args.update(modify(model, x, y))
    snapshot = copy.deepcopy(model.state_dict())
    x_arg = args["x"]
    x_before = x_arg.clone() if isinstance(x_arg, torch.Tensor) else None
    flag_before = x_arg.requires_grad if isinstance(x_arg, torch.Tensor) else None
    kwargs = {k: v for k, v in args.items() if k not in ("model", "x", "y")}
    with pytest.raises(exc, match=msg):
        jsigr_fast.loss(args["model"], args["x"], args["y"], **kwargs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    if x_before is not None:
        assert torch.equal(x_arg, x_before) or torch.isnan(x_before).any() and torch.equal(
            torch.nan_to_num(x_arg), torch.nan_to_num(x_before))
        assert x_arg.requires_grad == flag_before


@pytest.mark.parametrize("fn,extra,msg", [
    (jsigr_fast.jacobian_norm, dict(estimator="trace"), "estimator must be one of"),
    (jsigr_fast.jacobian_norm, dict(backend="fast"), "backend must be one of"),
    (jsigr_fast.jacobian_norm, dict(n_proj=-2), "n_proj must be >= 1"),
])
def test_jacobian_norm_rejects_bad_options(fn, extra, msg):
    model, x, _ = _setup()
    with pytest.raises(ValueError, match=msg):
        fn(model, x, **extra)


def test_input_gradient_penalty_mask_errors():
    model, x, y = _setup()
    with pytest.raises(ValueError, match="mask must have the input's shape"):
        jsigr_fast.input_gradient_penalty(model, x, y, mask=torch.ones(3, 3))
    with pytest.raises(TypeError, match="mask must be bool or floating point"):
        jsigr_fast.input_gradient_penalty(model, x, y, mask=torch.ones(x.shape, dtype=torch.int32))


def test_other_losses_validate_too():
    model, x, y = _setup()
    with pytest.raises(TypeError, match="squared must be a bool"):
        jsigr_fast.jacobian_regularization(model, x, y, squared="yes")
    with pytest.raises(ValueError, match="targets must have x's shape"):
        jsigr_fast.interpretation_regularization(model, x, y, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="lambda_ig must be >= 0"):
        jsigr_fast.double_backprop(model, x, y, lambda_ig=-0.1)
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        jsigr_fast.smoothgrad(model, x, y, n_samples=0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        jsigr_fast.input_gradient_penalty(model, x, y + 4)


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(72, 4)

    def forward(self, x):
        return self.lin(x.flatten(1)), x


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_hutchinson_checks_the_model_output(backend):
    # its forward-mode pass skipped the logits check every other path makes (a tuple gave an obscure
    # _unpack_dual error, an (N,) output a silent number)
    if backend not in jsigr_fast.available_backends():
        pytest.skip("extension not built")
    _, x, y = _setup()
    for n_proj in (1, 3):
        with pytest.raises(TypeError, match="model must return a tensor of logits, got tuple"):
            jsigr_fast.jacobian_norm(TupleOut().double(), x, estimator="hutchinson", n_proj=n_proj, backend=backend)
    with pytest.raises(ValueError, match=r"model must return \(N, K\)"):
        jsigr_fast.jacobian_norm(ThreeD().double(), x, estimator="hutchinson", backend=backend)


def test_inference_mode_is_a_clear_error():
    model, x, y = _setup()
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"called under torch.inference_mode\(\)"):
        jsigr_fast.loss(model, x, y)


def test_fd_jacobian_regularization_checks_labels():
    # its forward runs without y; the labels' range was never checked (-100: silently CE's ignore_index)
    model, x, y = _setup()
    for bad in (4, -1, -100):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
            jsigr_fast.jacobian_regularization(model, x, torch.tensor([0, 1, 2, 3, bad]), mode="fd",
                                               estimator="projection")


def test_numpy_scalars_are_numbers():
    np = pytest.importorskip("numpy")
    model, x, y = _setup()
    jsigr_fast.loss(model, x, y, lambda_m=np.float32(0.5), lambda_j=np.float64(0.1), n_proj=np.int64(2))


def test_criteria_check_their_input_shape_and_dtype():
    model, x, y = _setup()
    for bad in ((3, -1, 8), (3.5, 8, 8), (-5,), (2, 6)):
        with pytest.raises(ValueError, match="input_shape must be"):
            jsigr_fast.JSIGR(bad)
    for bad in ("abc", 5):
        with pytest.raises(TypeError, match="input_shape must be a per-sample shape"):
            jsigr_fast.JARN(bad)
    with pytest.raises(TypeError, match="adaptor_lr must be a real number"):
        jsigr_fast.JSIGR((2, 6, 6), adaptor_lr="0.1")
    for crit in (jsigr_fast.JSIGR((2, 8, 8)).double(), jsigr_fast.JARN((2, 8, 8)).double()):
        with pytest.raises(ValueError, match=r"x has per-sample shape \(2, 6, 6\) but this criterion was built for"):
            crit(model, x, y)
    for crit in (jsigr_fast.JSIGR((2, 6, 6)), jsigr_fast.JARN((2, 6, 6))):  # float32 criterion, float64 x
        with pytest.raises(TypeError, match=r"convert the criterion with .to\(torch.float64\)"):
            crit(model, x, y)


def test_module_constructors_validate():
    with pytest.raises(ValueError, match="input_shape must be"):
        jsigr_fast.JSIGR((3, 32))
    with pytest.raises(ValueError, match="channels must be one of"):
        jsigr_fast.JARN((3, 8, 8), discriminator="imagenet")
    with pytest.raises(ValueError, match="disc_every must be >= 1"):
        jsigr_fast.JARN((3, 8, 8), disc_every=0)
    with pytest.raises(ValueError, match="generator_loss must be one of"):
        jsigr_fast.JSIGR((3, 8, 8), generator_loss="wgan")


def test_explicit_unavailable_backend_is_a_clear_error(monkeypatch):
    model, x, y = _setup()
    monkeypatch.setattr(jsigr_fast.functional, "available_backends", lambda device: ["reference"])
    with pytest.raises(RuntimeError, match="backend='fused' is not available"):
        jsigr_fast.loss(model, x, y, backend="fused")
    jsigr_fast.loss(model, x, y, backend="auto")  # auto falls back quietly


@pytest.mark.parametrize("call", [
    lambda m, x, y, **kw: jsigr_fast.loss(m, x, y, **kw),
    lambda m, x, y, **kw: jsigr_fast.jacobian_regularization(m, x, y, **kw),
    lambda m, x, y, **kw: jsigr_fast.JSIGR((2, 6, 6)).double()(m, x, y, **kw),
    lambda m, x, y, **kw: jsigr_fast.JARN((2, 6, 6)).double()(m, x, y, **kw),
], ids=["loss", "jacobian_regularization", "JSIGR", "JARN"])
def test_return_terms_and_generator_are_checked(call):
    # a truthy string was taken as yes, and the criteria's generator reached x.device as a str
    model, x, y = _setup()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="return_terms must be a bool, got str"):
        call(model, x, y, return_terms="yes")
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got str"):
        call(model, x, y, generator="x")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
