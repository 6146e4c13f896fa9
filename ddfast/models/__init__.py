"""Networks used by the distillers, each split as ``features`` (x → h) and ``head`` (an ``nn.Linear``).

``model(x) == model.head(model.features(x))``; ``model.feature_dim`` is the width of h. The split
gives the fused label meta-gradient its head GEMM and LD-RR its ridge-regression layer
(label-distillation Figure 5).
"""

from ddfast.models.alexnet import AlexNet
from ddfast.models.convnet import ConvNet
from ddfast.models.lenet import LeNet
from ddfast.models.mlp import MLP
from ddfast.models.resnet import ResNet10, ResNet18
from ddfast.models.vgg import VGG11

__all__ = ["LeNet", "AlexNet", "ConvNet", "ResNet18", "ResNet10", "VGG11", "MLP", "build_model", "MODELS"]

def _resnet18_ld(in_channels: int = 3, num_classes: int = 10, image_size: int = 32, **options):
    """label-distillation's ResNet-18: 64-d features into the head / ridge-regression layer (Table 14)."""
    return ResNet18(in_channels, num_classes, image_size, features=options.pop("features", 64), **options)


MODELS = {"lenet": LeNet, "alexnet": AlexNet, "convnet": ConvNet, "resnet18": ResNet18, "resnet10": ResNet10,
          "vgg11": VGG11, "mlp": MLP, "resnet18-ld": _resnet18_ld}


def build_model(name: str, in_channels: int, num_classes: int, image_size: int, **options):
    """A fresh randomly initialised network by name (``lenet``, ``alexnet``, ``convnet``, ``resnet18``,
    ``resnet18-ld`` (64-d features, label-distillation Table 14), ``resnet10``, ``vgg11``, ``mlp``).

    ``options`` go to the class (e.g. ``widths=``/``norm=`` for ConvNet, ``width=`` for ResNet18/ResNet10/VGG11).
    """
    try:
        cls = MODELS[name.lower()]
    except KeyError:
        raise ValueError(f"model: expected one of {sorted(MODELS)}, got {name!r}") from None
    return cls(in_channels=in_channels, num_classes=num_classes, image_size=image_size, **options)
