"""Model zoo for the papers' experiments: images in [0, 1], a fixed ``Normalize`` first layer.

=================  ==============================================  ==========  ==============
name               architecture                                    input       parameters*
=================  ==============================================  ==========  ==============
``digits_cnn``     conv 32 -> conv 64/2 -> linear (sklearn digits)  1x8x8       29,066
``mnist_cnn``      JARN/J-SIGR MNIST CNN, 64-128-256, k5 s2        1x28x28     1,067,018
``resnet20..110``  He et al. CIFAR ResNet, option-B shortcuts      3x32x32     272,474 (R-20)
``resnet20_jsigr`` J-SIGR's ResNet-20: 9x9 kernels, 9-18-36        3x32x32     765,325
``cifar_resnet``   any depth 6n+2, any widths
``wrn28_10``       WideResNet-28-10 (JARN's CIFAR model)           3x32x32     36,479,194
``wrn34_10``       WideResNet-34-10 (Madry et al.)                 3x32x32     46,160,474
``wide_resnet``    any WRN-d-k
``resnet18/34``    ImageNet ResNet, torchvision layer names        3x224x224   11,689,512 (R-18)
=================  ==============================================  ==========  ==============

\\* default arguments, 10 classes (1000 for the ImageNet models).

Every constructor takes ``num_classes, in_channels, mean, std, activation`` (``"relu"``,
``"gelu"``, ``"silu"``); the ResNets also take ``norm`` (``"batch"``, ``"group"``, ``"none"``).
``mean=None``/``std=None`` mean the statistics of the model's usual dataset (``DATASET_STATS``).
Activations are never inplace, so double backprop through every model works.
"""
from .layers import ACTIVATIONS, NORMS
from .normalize import DATASET_STATS, Normalize
from .registry import (DATASET_NUM_CLASSES, DEFAULT_MODELS, MODELS, default_model_for, get_model,
                       list_models)
from .resnet_cifar import (CifarResNet, cifar_resnet, resnet20, resnet20_jsigr, resnet32, resnet44,
                           resnet56, resnet110)
from .resnet_imagenet import ImageNetResNet, resnet18, resnet34
from .small_cnn import SmallCNN, digits_cnn, mnist_cnn
from .wide_resnet import WideResNet, wide_resnet, wrn28_10, wrn34_10

__all__ = [
    "get_model", "list_models", "default_model_for", "MODELS", "DATASET_STATS",
    "DATASET_NUM_CLASSES", "DEFAULT_MODELS", "ACTIVATIONS", "NORMS", "Normalize",
    "SmallCNN", "mnist_cnn", "digits_cnn",
    "CifarResNet", "cifar_resnet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet20_jsigr",
    "WideResNet", "wide_resnet", "wrn28_10", "wrn34_10",
    "ImageNetResNet", "resnet18", "resnet34",
]
