"""Model zoo: shapes, published parameter counts, the fixed Normalize layer, activation/norm
options, double backprop, channels_last, and a short real training run on sklearn's digits."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jsigr_fast.models as M
from jsigr_fast.models import DATASET_STATS, Normalize, get_model

ACTIVATION_TYPES = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny convs on a shared 2-core box run several times faster on one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# name -> (constructor kwargs, test input shape, num_classes). Small spatial sizes where the model
# allows any size; the big ones get one sample at their nominal size.
CASES = {
    "digits_cnn": ({}, (4, 1, 8, 8), 10),
    "mnist_cnn": ({}, (2, 1, 28, 28), 10),
    "resnet20": ({}, (2, 3, 32, 32), 10),
    "resnet32": ({}, (2, 3, 32, 32), 10),
    "resnet44": ({}, (2, 3, 32, 32), 10),
    "resnet56": ({}, (2, 3, 32, 32), 10),
    "resnet110": ({}, (2, 3, 16, 16), 10),
    "resnet20_jsigr": ({}, (2, 3, 32, 32), 10),
    "cifar_resnet": ({"depth": 8}, (2, 3, 32, 32), 10),
    "wide_resnet": ({"depth": 10, "widen_factor": 2}, (2, 3, 32, 32), 10),
    "wrn28_10": ({}, (1, 3, 32, 32), 10),
    "wrn34_10": ({}, (1, 3, 16, 16), 10),
    "resnet18": ({}, (1, 3, 224, 224), 1000),
    "resnet34": ({}, (1, 3, 64, 64), 1000),
}

# Families for the option tests, each with a cheap configuration and input.
FAMILIES = {
    "digits_cnn": ({}, (4, 1, 8, 8)),
    "mnist_cnn": ({}, (2, 1, 28, 28)),
    "resnet20": ({}, (2, 3, 16, 16)),
    "resnet20_jsigr": ({}, (2, 3, 16, 16)),
    "wide_resnet": ({"depth": 10, "widen_factor": 2}, (2, 3, 16, 16)),
    "resnet18": ({}, (2, 3, 32, 32)),
}


@functools.lru_cache(maxsize=None)
def _built(name: str) -> nn.Module:
    """One default instance per registered name (WRN-28-10 alone is 36M parameters)."""
    torch.manual_seed(0)
    return get_model(name, **CASES[name][0])


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_cases_cover_the_registry():
    assert set(CASES) == set(M.MODELS) == set(M.list_models())
    assert M.list_models() == sorted(M.list_models())


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("name", sorted(CASES))
def test_output_shape(name):
    _, shape, classes = CASES[name]
    model = _built(name).eval()
    with torch.no_grad():
        out = model(torch.rand(shape))
    assert out.shape == (shape[0], classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_num_classes_and_in_channels(name):
    kwargs, shape = FAMILIES[name]
    channels = 1 if shape[1] == 3 else 3
    model = get_model(name, num_classes=7, in_channels=channels, mean=0.5, std=0.25, **kwargs).eval()
    with torch.no_grad():
        out = model(torch.rand(shape[0], channels, *shape[2:]))
    assert out.shape == (shape[0], 7)
    assert model.input_shape[0] == channels


def test_mnist_cnn_stride_readings():
    # Default reading: kernel 5, stride 2, padding 2 -> 28, 14, 7, 4.
    model = M.mnist_cnn()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256]
    assert all(c.kernel_size == (5, 5) and c.stride == (2, 2) and c.padding == (2, 2) for c in convs)
    assert model.fc.in_features == 256 * 4 * 4
    # The literal "stride of 5" reading: 28 -> 6 -> 2 -> 1.
    literal = M.mnist_cnn(stride=5).eval()
    assert literal.fc.in_features == 256
    assert literal(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    pooled = M.mnist_cnn(head="avg").eval()
    assert pooled.fc.in_features == 256
    assert pooled(torch.rand(1, 1, 40, 40)).shape == (1, 10)  # any input size


def test_width_multiplier_and_jsigr_variant():
    def stage_widths(m):
        return [m.layer1[0].conv2.out_channels, m.layer2[0].conv2.out_channels,
                m.layer3[0].conv2.out_channels]

    assert stage_widths(M.resnet20()) == [16, 32, 64]
    assert stage_widths(M.resnet20(width=1.5)) == [24, 48, 96]
    assert stage_widths(M.resnet56(width=2)) == [32, 64, 128]
    assert len(M.resnet56().layer1) == 9
    jsigr = M.resnet20_jsigr()
    assert stage_widths(jsigr) == [9, 18, 36]
    assert stage_widths(M.resnet20_jsigr(width=2)) == [18, 36, 72]
    for name, conv in jsigr.named_modules():
        if isinstance(conv, nn.Conv2d):
            expected = (1, 1) if "downsample" in name else (9, 9)
            assert conv.kernel_size == expected, name
    assert jsigr.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 10)


def test_wrn_dropout_option():
    model = M.wide_resnet(10, 2, dropout=0.3)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 3 and all(d.p == 0.3 for d in drops)  # one per block, n = 1 per stage
    assert not any(isinstance(m, nn.Dropout) for m in M.wide_resnet(10, 2).modules())


# ----------------------------------------------------------------------------- parameter counts

def _cifar_resnet_params(n: int) -> int:
    """Option-B CIFAR ResNet, depth 6n+2, widths 16-32-64, BatchNorm (2 params/channel), 10 classes.

    stem: 3*16*9 + 32 = 464; fc: 64*10 + 10 = 650.
    stage 1, every block: 2 * (16*16*9 + 32) = 4,672.
    stage 2, first block: 16*32*9 + 64 + 32*32*9 + 64 + (16*32 + 64 projection) = 14,528;
             others: 2 * (32*32*9 + 64) = 18,560.
    stage 3, first block: 32*64*9 + 128 + 64*64*9 + 128 + (32*64 + 128 projection) = 57,728;
             others: 2 * (64*64*9 + 128) = 73,984.
    total = 464 + 650 + 4,672n + 14,528 + 57,728 + (n - 1)(18,560 + 73,984) = 97,216n - 19,174.
    """
    return 97_216 * n - 19_174


# He et al. (2016) Table 6 lists 0.27M / 0.46M / 0.66M / 0.85M / 1.7M with option-A shortcuts
# (parameter-free); exact option-A counts are these. Option B adds the two projections with their
# BatchNorms: 16*32 + 64 + 32*64 + 128 = 2,752.
OPTION_A = {20: 269_722, 32: 464_154, 44: 658_586, 56: 853_018, 110: 1_727_962}
PROJECTIONS = 16 * 32 + 64 + 32 * 64 + 128


@pytest.mark.parametrize("depth", sorted(OPTION_A))
def test_cifar_resnet_parameter_counts(depth):
    model = get_model(f"resnet{depth}")
    count = _n_params(model)
    assert count == _cifar_resnet_params((depth - 2) // 6)
    assert count - PROJECTIONS == OPTION_A[depth]
    projection = sum(p.numel() for n, p in model.named_parameters() if "downsample" in n)
    assert projection == PROJECTIONS


def test_other_parameter_counts():
    # J-SIGR ResNet-20: 9x9 kernels (81 taps), 9-18-36 channels, BatchNorm, option-B projections.
    k = 81
    jsigr = (3 * 9 * k + 18                                            # stem
             + 3 * 2 * (9 * 9 * k + 18)                                # stage 1
             + (9 * 18 * k + 36 + 18 * 18 * k + 36 + 9 * 18 + 36)      # stage 2, first block
             + 2 * 2 * (18 * 18 * k + 36)                              # stage 2, others
             + (18 * 36 * k + 72 + 36 * 36 * k + 72 + 18 * 36 + 72)    # stage 3, first block
             + 2 * 2 * (36 * 36 * k + 72)                              # stage 3, others
             + 36 * 10 + 10)                                           # fc
    assert jsigr == 765_325
    assert _n_params(M.resnet20_jsigr()) == jsigr
    # MNIST CNN: convs with biases, 5x5 kernels, flatten of 256x4x4.
    mnist = (1 * 64 * 25 + 64) + (64 * 128 * 25 + 128) + (128 * 256 * 25 + 256) + 256 * 16 * 10 + 10
    assert _n_params(M.mnist_cnn()) == mnist == 1_067_018
    # Digits CNN: 3x3 convs with biases, flatten of 64x4x4.
    digits = (9 * 32 + 32) + (32 * 64 * 9 + 64) + 64 * 16 * 10 + 10
    assert _n_params(M.digits_cnn()) == digits == 29_066
    # torchvision's resnet18 / resnet34 (1000 classes) and the standard WRN-28-10 / WRN-34-10.
    assert _n_params(_built("resnet18")) == 11_689_512
    assert _n_params(_built("resnet34")) == 21_797_672
    assert _n_params(_built("wrn28_10")) == 36_479_194
    assert _n_params(_built("wrn34_10")) == 46_160_474


def test_resnet18_state_dict_is_torchvision_shaped():
    sd = _built("resnet18").state_dict()
    assert len(sd) == 122  # 62 parameters + 60 BatchNorm buffers, as torchvision's resnet18
    assert not any(k.startswith("normalize") for k in sd)
    expected = {"conv1.weight": (64, 3, 7, 7), "bn1.running_var": (64,),
                "layer1.0.conv1.weight": (64, 64, 3, 3), "layer2.0.downsample.0.weight": (128, 64, 1, 1),
                "layer2.0.downsample.1.num_batches_tracked": (), "layer4.1.bn2.weight": (512,),
                "fc.weight": (1000, 512), "fc.bias": (1000,)}
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "layer1.0.downsample.0.weight" not in sd
    fresh = M.resnet18()
    fresh.load_state_dict(sd, strict=True)
    assert torch.equal(fresh.normalize.mean.flatten(), torch.tensor(DATASET_STATS["imagenet"][0]))


# ----------------------------------------------------------------------------- Normalize

def test_normalize_is_exact_and_parameter_free():
    mean, std = DATASET_STATS["cifar10"]  # not powers of two: x * (1/std) would differ
    layer = Normalize(mean, std)
    assert list(layer.parameters()) == []
    assert {n for n, _ in layer.named_buffers()} == {"mean", "std"}
    x = torch.rand(2, 3, 5, 4)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.equal(layer(x), expected)
    identity = Normalize(0.0, 1.0)
    assert torch.equal(identity(x), x)
    assert torch.equal(Normalize((0.5,), (2.0,))(x), (x - 0.5) / 2.0)  # one value, every channel
    with pytest.raises(ValueError, match="std"):
        Normalize((0.0,), (0.0,))
    with pytest.raises(ValueError, match="entries"):
        Normalize((0.1, 0.2), (1.0, 1.0, 1.0))
    with pytest.raises(RuntimeError):
        layer(torch.rand(2, 2, 5, 4))


@pytest.mark.parametrize("name", sorted(CASES))
def test_normalize_is_the_fixed_first_layer(name):
    _, shape, _ = CASES[name]
    model = _built(name)
    norms = [m for m in model.modules() if isinstance(m, Normalize)]
    assert len(norms) == 1 and norms[0] is model.normalize
    assert not any(n.startswith("normalize") for n, _ in model.named_parameters())
    assert not model.normalize.mean.requires_grad and not model.normalize.std.requires_grad
    if name in ("wrn28_10", "wrn34_10", "resnet18", "resnet34"):
        return  # the forward-order check below costs a second forward of a big model
    order: list[nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda mod, _: order.append(mod))
             for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model.eval()(torch.rand(shape))
    finally:
        for h in hooks:
            h.remove()
    assert order[0] is model.normalize


@pytest.mark.parametrize("name, dataset", [("digits_cnn", "digits"), ("mnist_cnn", "mnist"),
                                           ("resnet20", "cifar10"), ("resnet20_jsigr", "cifar10"),
                                           ("wide_resnet", "cifar10"), ("resnet18", "imagenet")])
def test_default_statistics(name, dataset):
    model = get_model(name, **FAMILIES[name][0])
    mean, std = DATASET_STATS[dataset]
    assert torch.equal(model.normalize.mean.flatten(), torch.tensor(mean))
    assert torch.equal(model.normalize.std.flatten(), torch.tensor(std))


def test_normalize_survives_training_step():
    model = M.digits_cnn()
    before = model.normalize.mean.clone(), model.normalize.std.clone()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    F.cross_entropy(model(torch.rand(8, 1, 8, 8)), torch.arange(8)).backward()
    opt.step()
    assert torch.equal(model.normalize.mean, before[0]) and torch.equal(model.normalize.std, before[1])


# ----------------------------------------------------------------------------- options

@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_activation_option_changes_module_types(name):
    kwargs, shape = FAMILIES[name]
    counts = {}
    for act, cls in ACTIVATION_TYPES.items():
        model = get_model(name, activation=act, **kwargs)
        found = [m for m in model.modules() if isinstance(m, tuple(ACTIVATION_TYPES.values()))]
        assert found and all(type(m) is cls for m in found), act
        assert not any(getattr(m, "inplace", False) for m in model.modules())
        counts[act] = len(found)
    assert len(set(counts.values())) == 1
    torch.manual_seed(0)
    relu = get_model(name, activation="relu", **kwargs).eval()
    torch.manual_seed(0)
    gelu = get_model(name, activation="gelu", **kwargs).eval()
    x = torch.rand(shape)
    with torch.no_grad():
        assert not torch.allclose(relu(x), gelu(x))


@pytest.mark.parametrize("name", ["digits_cnn", "mnist_cnn", "resnet20", "wide_resnet", "resnet18"])
def test_norm_option(name):
    kwargs, shape = FAMILIES[name]
    for norm, present, absent in [("batch", nn.BatchNorm2d, nn.GroupNorm),
                                  ("group", nn.GroupNorm, nn.BatchNorm2d)]:
        model = get_model(name, norm=norm, **kwargs)
        assert any(isinstance(m, present) for m in model.modules()), norm
        assert not any(isinstance(m, absent) for m in model.modules()), norm
    plain = get_model(name, norm="none", **kwargs)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in plain.modules())
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))
    out = plain.eval()(torch.rand(shape))
    assert torch.isfinite(out).all()


def test_group_norm_groups_divide_odd_widths():
    model = M.resnet20_jsigr(norm="group")  # 9, 18, 36 channels
    groups = {(m.num_channels, m.num_groups) for m in model.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {(9, 3), (18, 6), (36, 6)}


def test_norm_none_resnet_starts_as_its_shortcuts():
    # zero_init_residual defaults on without normalisation: each block's branch outputs zero.
    model = M.resnet20(norm="none", activation="gelu").eval()
    block = model.layer1[1]
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(block(x), block.act2(x))
    assert not torch.equal(M.resnet20(norm="none", zero_init_residual=False).layer1[1].conv2.weight,
                           torch.zeros_like(block.conv2.weight))


# ----------------------------------------------------------------------------- double backprop

def _input_gradient_penalty_grads(model, x, y):
    x = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x), y)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    penalty = g.pow(2).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return penalty, torch.autograd.grad(penalty, params)


@pytest.mark.parametrize("name, kwargs, shape", [
    ("digits_cnn", {}, (8, 1, 8, 8)),
    ("digits_cnn", {"norm": "batch"}, (8, 1, 8, 8)),
    ("digits_cnn", {"norm": "group", "activation": "silu"}, (8, 1, 8, 8)),
    ("mnist_cnn", {"activation": "gelu"}, (2, 1, 28, 28)),
    ("resnet20", {}, (4, 3, 32, 32)),
    ("resnet20", {"activation": "gelu"}, (4, 3, 32, 32)),
    ("resnet20", {"norm": "none", "activation": "silu"}, (4, 3, 16, 16)),
    ("resnet20_jsigr", {"activation": "gelu"}, (2, 3, 16, 16)),
    ("wide_resnet", {"depth": 10, "widen_factor": 2, "dropout": 0.3}, (2, 3, 16, 16)),
    ("resnet18", {"num_classes": 10}, (2, 3, 32, 32)),
])
def test_double_backprop_train_mode(name, kwargs, shape):
    torch.manual_seed(0)
    model = get_model(name, **kwargs).train()
    x, y = torch.rand(shape), torch.randint(0, 10, (shape[0],))
    penalty, grads = _input_gradient_penalty_grads(model, x, y)
    assert torch.isfinite(penalty) and penalty > 0
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    first_grad = grads[[id(p) for p in model.parameters()].index(id(first_conv.weight))]
    assert first_grad.abs().sum() > 0  # the penalty's gradient reaches the bottom layer


@pytest.mark.parametrize("name, kwargs, shape", [
    ("digits_cnn", {"norm": "batch", "activation": "gelu"}, (6, 1, 8, 8)),
    ("cifar_resnet", {"depth": 8, "widths": (4, 8, 8), "activation": "silu"}, (3, 3, 8, 8)),
    ("wide_resnet", {"depth": 10, "widen_factor": 1, "norm": "group", "activation": "gelu"},
     (2, 3, 8, 8)),
])
def test_double_backprop_matches_finite_differences(name, kwargs, shape):
    # d/dθ ||∇x CE||² along a random direction, against a central difference in float64. An inplace
    # op or a wrong double-backward rule would show up here, not only as an exception.
    torch.manual_seed(0)
    model = get_model(name, **kwargs).double().train()
    x, y = torch.rand(shape, dtype=torch.float64), torch.randint(0, 10, (shape[0],))
    params = list(model.parameters())
    _, grads = _input_gradient_penalty_grads(model, x, y)
    direction = [torch.randn_like(p) for p in params]
    analytic = sum((g * d).sum() for g, d in zip(grads, direction))

    def penalty_at(step):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(d, alpha=step)
        value = _input_gradient_penalty_grads(model, x, y)[0].detach()
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.sub_(d, alpha=step)
        return value

    h = 1e-5
    numeric = (penalty_at(h) - penalty_at(-h)) / (2 * h)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- channels_last

@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_channels_last_matches_contiguous(name):
    kwargs, shape = FAMILIES[name]
    torch.manual_seed(0)
    model = get_model(name, **kwargs).eval()
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.rand(shape)
    with torch.no_grad():
        ref = model(x)
        out = cl_model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_channels_last_input_gradient_train_mode():
    torch.manual_seed(0)
    model = M.resnet20(activation="gelu").train()
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 10, (4,))
    grads = []
    for m, xin in [(model, x), (cl_model, x.contiguous(memory_format=torch.channels_last))]:
        xin = xin.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(m(xin), y), xin, create_graph=True)
        (gp,) = torch.autograd.grad(g.pow(2).sum(), m.conv1.weight)
        grads.append((g.detach(), gp))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------- real training

@pytest.mark.parametrize("norm", ["none", "batch"])
def test_digits_cnn_learns_sklearn_digits(norm):
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = M.digits_cnn(norm=norm)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        order = train[torch.randperm(len(train))]
        for i in range(0, len(order), 64):
            b = order[i:i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    assert acc > 0.9
    chance = M.digits_cnn(norm=norm).eval()
    with torch.no_grad():
        assert (chance(x[test]).argmax(1) == y[test]).float().mean().item() < 0.5


# ----------------------------------------------------------------------------- registry

def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*resnet20.*wrn28_10"):
        get_model("resnet19")
    with pytest.raises(ValueError, match="unknown model"):
        get_model(None)
    with pytest.raises(TypeError, match=r"get_model\('resnet20'\).*foo.*accepted arguments:.*width"):
        get_model("resnet20", foo=1)
    with pytest.raises(TypeError, match="depth"):
        get_model("wide_resnet")
    with pytest.raises(ValueError, match="activation must be one of 'relu', 'gelu', 'silu'"):
        get_model("resnet20", activation="tanh")
    with pytest.raises(ValueError, match="norm must be one of"):
        get_model("digits_cnn", norm="layer")
    with pytest.raises(ValueError, match="width"):
        get_model("resnet20", width=0)
    with pytest.raises(ValueError, match="6n \\+ 2"):
        get_model("cifar_resnet", depth=21)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        get_model("wide_resnet", depth=27, widen_factor=2)
    with pytest.raises(ValueError, match="in_channels=1"):
        get_model("resnet20", in_channels=1)  # CIFAR statistics have 3 channels
    with pytest.raises(TypeError, match="num_classes"):
        get_model("resnet20", num_classes=10.0)
    with pytest.raises(ValueError, match="unknown dataset"):
        get_model("resnet20", dataset="cifar11")
    with pytest.raises(ValueError, match="no default model"):
        M.default_model_for("cifar11")
    with pytest.raises(ValueError, match="shrinks to nothing"):
        get_model("mnist_cnn", input_size=4, stride=5, padding=0)
    assert isinstance(get_model("ResNet20"), M.CifarResNet)


def test_dataset_defaults():
    model = M.default_model_for("cifar10")
    assert isinstance(model, M.CifarResNet) and model.depth == 20
    svhn = get_model("resnet20", dataset="svhn")
    assert torch.equal(svhn.normalize.mean.flatten(), torch.tensor(DATASET_STATS["svhn"][0]))
    gray = get_model("resnet20", dataset="mnist")
    assert gray.conv1.in_channels == 1
    assert torch.equal(gray.normalize.std.flatten(), torch.tensor(DATASET_STATS["mnist"][1]))
    assert M.default_model_for("cifar100").fc.out_features == 100
    assert isinstance(M.default_model_for("mnist"), M.SmallCNN)
    assert M.default_model_for("digits").input_shape == (1, 8, 8)
    custom = get_model("resnet20", dataset="cifar10", mean=0.0, std=1.0)  # explicit kwargs win
    x = torch.rand(1, 3, 4, 4)
    assert torch.equal(custom.normalize(x), x)
    assert set(DATASET_STATS) >= {"mnist", "cifar10", "imagenet", "digits"}
