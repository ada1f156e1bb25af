"""jsigr_fast: gradient-based robustness regularization for PyTorch classifiers.

The centre is J-SIGR (Liu et al., Pattern Recognition 2023)::

    loss = jsigr_fast.loss(model, x, y)   # CE + λ_m·mean‖m ⊙ ∇ₓℓ‖² + λ_j·mean‖J‖²_F

around it Jacobian regularization (Jakubovitz & Giryes; Hoffman et al.), double backprop (Ross &
Doshi-Velez), JARN's adversarially trained saliency adaptor and Interpretation Regularization.
See README.md for the API table and ../SPEC.md-style scaling conventions in jsigr_fast.reference.
"""
from ._checks import unwrap_parallel
from ._extension import extension_error, extension_loaded
from .adversarial import Discriminator, SaliencyGAN
from .batchnorm import batch_coupled, frozen_running_stats
from .cuda_graphs import GraphedStep, graphed_step
from .functional import (
    available_backends,
    double_backprop,
    input_gradient_penalty,
    interpretation_regularization,
    jacobian_norm,
    jacobian_regularization,
    loss,
    smoothgrad,
)
from .jarn import JARN
from .jsigr import JSIGR
from .ops import masked_sq_norm
from .saliency import SaliencyAdaptor, gradient_saliency, perturbed_input_gradient, selective_mask

__version__ = "0.1.0"

_SUBMODULES = ("attacks", "models", "data", "testing", "evaluate", "visualize", "jacobian_layers", "train")


def __getattr__(name):  # jsigr_fast.models etc. on first use, so `import jsigr_fast` stays light
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "loss", "input_gradient_penalty", "jacobian_norm", "jacobian_regularization", "double_backprop",
    "smoothgrad", "interpretation_regularization", "JSIGR", "JARN", "SaliencyAdaptor", "Discriminator",
    "SaliencyGAN", "masked_sq_norm", "perturbed_input_gradient", "gradient_saliency", "selective_mask",
    "batch_coupled", "frozen_running_stats", "available_backends", "extension_loaded", "extension_error",
    "unwrap_parallel", "graphed_step", "GraphedStep",
]
