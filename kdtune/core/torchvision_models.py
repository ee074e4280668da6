"""torchvision's and timm's classification networks as kdtune families: teachers at their published widths.

torchvision: ``resnet18``, ``resnet34``, ``resnet50``, ``mobilenet_v3_small``,
``mobilenet_v3_large``, ``efficientnet_b0``, ``regnet_x_400mf``,
``regnet_y_400mf`` (``mobilenet_v2`` lives in :mod:`kdtune.models` with its
width knob). They are built with ``weights=None``: random initialisation, never a
download; trained weights come from a teacher's ``checkpoint``.

Small inputs: ImageNet stems downsample 4x (ResNet: 7x7 stride-2 conv, then a
max-pool) or 2x (the others: stride-2 3x3 conv) before the first stage, which
leaves a 32-pixel image 1x1 maps long before the head. With ``small_input``
(default: when the shorter image side is below 64 pixels) kdtune does what the
CIFAR literature does: ResNets get a 3x3 stride-1 stem conv and no max-pool;
the others keep their stem conv with stride 1. Inputs with other than 3
channels get a stem conv with that many input channels.

torchvision exposes no width knob for these builders (ResNet rejects another
base width; MobileNetV3 and EfficientNet widths exist only in private config
builders), so ``width`` must be 1: the width-scaled students are kdtune's own
families (``resnet``, ``resnet8`` ..., ``wrn``, ``vgg``, ``mobilenet_v2``).

``timm`` (option ``name``, any ``timm.list_models()`` name, ``pretrained`` never
set) needs the optional extra ``pip install 'kdtune[timm]'``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.errors import ConfigError
from kdtune.core.models import MODELS, InputShape, ModelFactory, Network

#: Below this shorter image side, ``small_input`` defaults to True.
SMALL_INPUT_BELOW = 64


class ClassifierNetwork(Network):
    """A ``body`` that gives feature maps, global average pooling, then ``classifier`` on the pooled vector."""

    feature_kind = "map"

    def __init__(self, body: nn.Module, classifier: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.body = body
        self.classifier = classifier
        self.feature_dim = feature_dim

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)), features


def _stem_conv(old: nn.Conv2d, in_channels: int, stride: int, kernel: int | None = None) -> nn.Conv2d:
    """A fresh stem conv like ``old`` but with ``in_channels`` inputs, ``stride`` and (optionally) ``kernel``."""
    kernel = old.kernel_size[0] if kernel is None else kernel
    conv = nn.Conv2d(
        in_channels, old.out_channels, kernel, stride=stride, padding=kernel // 2, bias=old.bias is not None
    )
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _resnet_parts(model: nn.Module, in_channels: int, small: bool) -> tuple[nn.Module, nn.Module, int]:
    if small:
        model.conv1 = _stem_conv(model.conv1, in_channels, stride=1, kernel=3)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = _stem_conv(model.conv1, in_channels, stride=2)
    body = nn.Sequential(
        model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4
    )
    return body, model.fc, model.fc.in_features


def _features_parts(model: nn.Module, in_channels: int, small: bool) -> tuple[nn.Module, nn.Module, int]:
    # MobileNetV3 and EfficientNet: model.features[0][0] is the stride-2 stem conv.
    stem = model.features[0][0]
    if small or in_channels != 3:
        model.features[0][0] = _stem_conv(stem, in_channels, stride=1 if small else stem.stride[0])
    feature_dim = model.features[-1].out_channels
    return model.features, model.classifier, feature_dim


def _regnet_parts(model: nn.Module, in_channels: int, small: bool) -> tuple[nn.Module, nn.Module, int]:
    stem = model.stem[0]
    if small or in_channels != 3:
        model.stem[0] = _stem_conv(stem, in_channels, stride=1 if small else stem.stride[0])
    return nn.Sequential(model.stem, model.trunk_output), model.fc, model.fc.in_features


_Parts = Callable[[nn.Module, int, bool], tuple[nn.Module, nn.Module, int]]

#: kdtune family name -> how to split torchvision's model of that name into body and classifier.
TORCHVISION_FAMILIES: dict[str, _Parts] = {
    "resnet18": _resnet_parts,
    "resnet34": _resnet_parts,
    "resnet50": _resnet_parts,
    "mobilenet_v3_small": _features_parts,
    "mobilenet_v3_large": _features_parts,
    "efficientnet_b0": _features_parts,
    "regnet_x_400mf": _regnet_parts,
    "regnet_y_400mf": _regnet_parts,
}


def _check_unit_width(family: str, width: float) -> None:
    if width != 1:
        raise ConfigError(
            "width",
            f"{family} comes at its published width only, so width must be 1, got {width}; for width-scaled "
            "students use resnet, resnet8 ... resnet110, wrn, vgg or mobilenet_v2",
        )


def _is_small(input_shape: InputShape, small_input: bool | None) -> bool:
    if small_input is None:
        return min(input_shape[1:]) < SMALL_INPUT_BELOW
    if not isinstance(small_input, bool):
        raise ConfigError("small_input", f"must be true, false or null (automatic), got {small_input!r}")
    return small_input


def _torchvision_factory(name: str, parts: _Parts) -> ModelFactory:
    def factory(
        input_shape: InputShape, num_classes: int, width: float, small_input: bool | None = None
    ) -> Network:
        import torchvision.models

        _check_unit_width(name, width)
        small = _is_small(input_shape, small_input)
        # weights=None: random initialisation, never a download.
        model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        body, classifier, feature_dim = parts(model, input_shape[0], small)
        return ClassifierNetwork(body, classifier, feature_dim)

    factory.__name__ = name
    factory.__doc__ = (
        f"torchvision's {name} (random init, width 1); ``small_input`` (default: shorter side "
        f"< {SMALL_INPUT_BELOW} px) makes the stem stride 1" + (" with a 3x3 conv and no max-pool" if parts is
        _resnet_parts else "") + "."
    )
    return factory


for _name, _parts in TORCHVISION_FAMILIES.items():
    MODELS.register(_name)(_torchvision_factory(_name, _parts))


# ---------------------------------------------------------------- timm


class TimmNetwork(Network):
    """A timm model seen through :class:`Network`; features are its pooled pre-logits vector.

    Pre-logits (``forward_head(..., pre_logits=True)``) exist for every timm
    architecture, CNNs and vision transformers alike, so the feature term works
    the same way for all of them.
    """

    feature_kind = "vector"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # Some heads widen the pooled features before the classifier (MobileNetV3: 576 -> 1024).
        self.feature_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre_logits = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return self.model.get_classifier()(pre_logits), pre_logits


TIMM_MISSING = "family 'timm' needs the timm package; install it with: pip install 'kdtune[timm]'"


@MODELS.register("timm")
def timm_model(input_shape: InputShape, num_classes: int, width: float, name: str = "resnet18") -> Network:
    """Any timm model by ``name`` (random init, width 1), for ``input_shape`` channels and ``num_classes``."""
    try:
        import timm
    except ImportError:
        raise ConfigError("model", TIMM_MISSING) from None
    _check_unit_width("timm", width)
    if not isinstance(name, str) or not timm.is_model(name):
        raise ConfigError("name", f"unknown timm model {name!r}; allowed: a name from timm.list_models()")
    channels, height, width_px = input_shape
    kwargs: dict[str, object] = {"pretrained": False, "num_classes": num_classes, "in_chans": channels}
    try:
        model = timm.create_model(name, img_size=(height, width_px), **kwargs)
    except TypeError:  # CNNs take any size and have no img_size argument
        model = timm.create_model(name, **kwargs)
    return TimmNetwork(model)
