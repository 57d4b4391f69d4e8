"""CNN definitions and a timm-style registry to build them by name.

>>> import torch
>>> from hwquant.models import create_model, list_models
>>> list_models()
['mobilenet_v2', 'resnet18', 'resnet20', 'small_cnn', 'vgg9']
>>> _ = torch.manual_seed(0)  # initial weights come from torch's global RNG
>>> model = create_model("resnet20", in_channels=1, num_classes=10, width=1.0)
>>> model(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
>>> model.first_layer_name, model.last_layer_name
('conv1', 'fc')

Structure every model keeps, for the quantization passes: convolutions followed by batch norm have no bias
and each conv->BN pair is visible to ``torch.fx.symbolic_trace``; every ReLU is its own non-inplace
``nn.ReLU`` module; the classifier is the ``nn.Linear`` attribute ``fc``; ``model.hwquant_args`` holds the
arguments that rebuild the architecture via :func:`create_model_from_args`.
"""

from .mobilenet import InvertedResidual, MobileNetV2, mobilenet_v2
from .registry import create_model, create_model_from_args, is_model, list_models, register_model
from .resnet import BasicBlock, CifarResNet, resnet18, resnet20
from .small_cnn import SmallCNN, small_cnn
from .vgg import VGG9, vgg9

__all__ = [
    "VGG9",
    "InvertedResidual",
    "MobileNetV2",
    "BasicBlock",
    "CifarResNet",
    "SmallCNN",
    "create_model",
    "create_model_from_args",
    "is_model",
    "list_models",
    "mobilenet_v2",
    "register_model",
    "resnet18",
    "resnet20",
    "small_cnn",
    "vgg9",
]
