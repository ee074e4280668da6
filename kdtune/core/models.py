"""Student and teacher networks whose size is set by one ``width`` knob.

Every family is a factory ``fn(input_shape, num_classes, width, **options)`` in
:data:`MODELS` that returns a :class:`Network`. ``width`` varies the size
smoothly so that a search can trade accuracy for size:

- ``mlp``: hidden units per layer (``int(round(width))``); option ``depth`` (hidden layers, default 2).
  Takes inputs of any shape (it flattens them): images, vectors, sequences.
- ``cnn``: channels of the first conv (``int(round(width))``), 3 convs.
- ``resnet``: multiplier of CIFAR ResNet's 16/32/64 stage channels; option ``depth`` (6n+2, default 20).
- ``mobilenet_v2``: torchvision's ``width_mult``; option ``dropout`` (default 0.2).

``input_shape`` is one sample's shape: ``(C, H, W)`` for images, ``(D,)`` for
vectors or sequences. ``cnn``, ``resnet`` and ``mobilenet_v2`` take images only
(:func:`require_image_shape`); a family of your own for other shapes is one
registration in a plugin. More families register themselves from
:mod:`kdtune.core.cifar_models` (the KD literature's CIFAR ResNets, WRNs and VGGs)
and :mod:`kdtune.core.torchvision_models` (torchvision's classifiers, timm);
``docs/models.md`` lists them all with sizes. A network exposes its
penultimate features through :meth:`Network.forward_features` so that a feature
distillation term can match them, after :func:`build_feature_adapter`, to a
teacher's.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.errors import ConfigError
from kdtune.registry import Registry

InputShape = tuple[int, ...]
ModelFactory = Callable[..., "Network"]

MODELS: Registry[ModelFactory] = Registry("model")

# The positional parameters every factory takes; whatever else it accepts is a family option.
_FACTORY_ARGUMENTS = ("input_shape", "num_classes", "width")


class Network(nn.Module):
    """Base class of kdtune's models: logits plus access to the penultimate features.

    Subclasses set :attr:`feature_dim` (units for vectors, channels for maps) and
    :attr:`feature_kind` (``"vector"`` for ``(B, D)``, ``"map"`` for ``(B, C, H, W)``)
    and implement :meth:`forward_features`.
    """

    feature_dim: int
    feature_kind: str

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` for images ``x`` of shape ``(B, C, H, W)``."""
        logits, _ = self.forward_features(x)
        return logits

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, penultimate features)`` computed in one pass."""
        raise NotImplementedError


def build_model(
    family: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    width: float,
    **options: object,
) -> Network:
    """Build a model of ``family`` for samples of ``input_shape`` (``(C, H, W)`` images,
    ``(D,)`` vectors, ...) and ``num_classes`` classes.

    ``options`` are the family's own keyword options (e.g. ``depth`` for ``mlp`` and
    ``resnet``). Raises :class:`ConfigError` for an unknown family, a width that is
    not > 0, an unknown option, or a bad shape or class count.
    """
    factory = MODELS.get(family)
    _check_width(width)
    shape = _check_input_shape(input_shape)
    if not _is_integer(num_classes) or num_classes < 1:
        raise ConfigError("num_classes", f"must be an integer >= 1, got {num_classes!r}")
    check_family_options(family, options)
    return factory(shape, int(num_classes), float(width), **options)


def check_family_options(family: str, options: dict[str, object]) -> None:
    """A :class:`ConfigError` for an unknown family or an option its factory does not take."""
    allowed = family_options(family)
    for name in options:
        if name not in allowed:
            listed = ", ".join(allowed) if allowed else "none"
            raise ConfigError(
                name, f"unknown option for model {family!r}; allowed options: {listed}"
            )


def family_options(family: str) -> list[str]:
    """Names of the keyword options the factory of ``family`` accepts, in signature order."""
    parameters = inspect.signature(MODELS.get(family)).parameters.values()
    return [
        p.name
        for p in parameters
        if p.name not in _FACTORY_ARGUMENTS
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements, trainable or frozen (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of parameters and persistent buffers in their own dtypes.

    This is what a saved ``state_dict`` holds (BatchNorm running statistics and
    its int64 batch counter included); tensors shared under several names count once.
    """
    seen: set[tuple[int, torch.dtype, tuple[int, ...]]] = set()
    total = 0
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def build_feature_adapter(student: Network, teacher_feature_dim: int) -> nn.Module:
    """Trainable map from the student's features to the teacher's feature width.

    ``Linear(student.feature_dim, teacher_feature_dim)`` for vector features, a 1x1
    ``Conv2d`` for feature maps. A 1x1 conv keeps the spatial size, so map features
    of student and teacher must already share ``H, W`` (pool one of them otherwise).
    """
    if not _is_integer(teacher_feature_dim) or teacher_feature_dim < 1:
        raise ConfigError(
            "teacher_feature_dim", f"must be an integer >= 1, got {teacher_feature_dim!r}"
        )
    teacher_feature_dim = int(teacher_feature_dim)
    if student.feature_kind == "vector":
        return nn.Linear(student.feature_dim, teacher_feature_dim)
    if student.feature_kind == "map":
        return nn.Conv2d(student.feature_dim, teacher_feature_dim, kernel_size=1)
    raise ValueError(f"unknown feature_kind {student.feature_kind!r}; expected 'vector' or 'map'")


def _is_integer(value: object) -> bool:
    # numbers.Integral admits numpy integers (e.g. ``labels.max() + 1``); bool is a mistake.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_width(width: float) -> None:
    if not _is_real(width):
        raise ConfigError("width", f"must be a number > 0, got {width!r}")
    if not (math.isfinite(width) and width > 0):
        raise ConfigError("width", f"must be a finite number > 0, got {width!r}")


def _check_input_shape(input_shape: tuple[int, ...]) -> InputShape:
    dims = tuple(input_shape) if isinstance(input_shape, (tuple, list, torch.Size)) else ()
    if len(dims) < 1 or any(not _is_integer(d) or d < 1 for d in dims):
        raise ConfigError(
            "input_shape", f"must be one sample's shape, positive integers such as (channels, height, width) "
                           f"or (features,), got {input_shape!r}"
        )
    return tuple(int(d) for d in dims)


def require_image_shape(family: str, input_shape: InputShape) -> tuple[int, int, int]:
    """``input_shape`` as ``(C, H, W)``, or a :class:`ConfigError` saying that ``family``
    takes images only and what to use instead."""
    if len(input_shape) != 3:
        raise ConfigError(
            "family", f"model {family!r} takes images (channels, height, width); this data's samples have shape "
                      f"{tuple(input_shape)}; use mlp (any shape) or a family of your own in a plugin"
        )
    return input_shape[0], input_shape[1], input_shape[2]


def _check_depth_option(depth: object, allowed: str) -> int:
    if not _is_integer(depth):
        raise ConfigError("depth", f"must be an integer; allowed: {allowed}, got {depth!r}")
    return int(depth)


def _units(width: float) -> int:
    """Absolute layer size from a width, never below one unit."""
    return max(1, int(round(width)))


# ---------------------------------------------------------------- mlp


class MLP(Network):
    """Flatten, ``depth`` hidden Linear+ReLU layers, Linear head; features = last hidden activation."""

    feature_kind = "vector"

    def __init__(self, in_features: int, num_classes: int, hidden: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        size = in_features
        for _ in range(depth):
            layers += [nn.Linear(size, hidden), nn.ReLU(inplace=True)]
            size = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, num_classes)
        self.feature_dim = hidden

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(x)
        return self.head(features), features


@MODELS.register("mlp")
def mlp(input_shape: InputShape, num_classes: int, width: float, depth: int = 2) -> Network:
    """Multilayer perceptron with ``depth`` hidden layers of ``round(width)`` units."""
    depth = _check_depth_option(depth, "an integer >= 1")
    if depth < 1:
        raise ConfigError("depth", f"must be >= 1 hidden layers; allowed: an integer >= 1, got {depth}")
    return MLP(math.prod(input_shape), num_classes, _units(width), depth)


# ---------------------------------------------------------------- cnn


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SmallCNN(Network):
    """conv(c)-conv(2c)-[maxpool]-conv(2c), each with BN+ReLU; head = global average pool + Linear."""

    feature_kind = "map"

    def __init__(self, in_channels: int, num_classes: int, channels: int, pool: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn_relu(in_channels, channels),
            _conv_bn_relu(channels, 2 * channels),
            nn.MaxPool2d(2) if pool else nn.Identity(),
            _conv_bn_relu(2 * channels, 2 * channels),
        )
        self.head = nn.Linear(2 * channels, num_classes)
        self.feature_dim = 2 * channels

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.body(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)), features


@MODELS.register("cnn")
def cnn(input_shape: InputShape, num_classes: int, width: float) -> Network:
    """Three-conv CNN for 8x8 to 32x32 images with ``round(width)`` base channels.

    The 2x2 max-pool is used only when both sides are >= 8 pixels, so that tiny
    inputs keep a spatial map; 8x8 digits give 4x4 features, 32x32 give 16x16.
    """
    channels, height, width_px = require_image_shape("cnn", input_shape)
    return SmallCNN(channels, num_classes, _units(width), pool=min(height, width_px) >= 8)


# ---------------------------------------------------------------- resnet


class BasicBlock(nn.Module):
    """He et al. (2016) basic block with the parameter-free shortcut of their CIFAR nets (option A).

    The shortcut subsamples by ``stride`` and zero-pads the extra channels, so the
    parameter count depends on the convolutions alone.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.extra_channels:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra_channels))
        return F.relu(out + shortcut, inplace=True)


class CifarResNet(Network):
    """CIFAR-style ResNet: conv3x3, three stages of basic blocks (strides 1, 2, 2), pool, Linear."""

    feature_kind = "map"

    def __init__(
        self, in_channels: int, num_classes: int, stage_channels: tuple[int, int, int], blocks: int
    ) -> None:
        super().__init__()
        first = stage_channels[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, first, 3, padding=1, bias=False),
            nn.BatchNorm2d(first),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        previous = first
        for index, channels in enumerate(stage_channels):
            stride = 1 if index == 0 else 2
            for block in range(blocks):
                stages.append(BasicBlock(previous, channels, stride if block == 0 else 1))
                previous = channels
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(previous, num_classes)
        self.feature_dim = previous
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.stages(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)), features


RESNET_DEPTHS = "6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)"


@MODELS.register("resnet")
def resnet(input_shape: InputShape, num_classes: int, width: float, depth: int = 20) -> Network:
    """CIFAR ResNet-``depth`` with stage channels ``round(16·width), round(32·width), round(64·width)``."""
    depth = _check_depth_option(depth, RESNET_DEPTHS)
    if depth < 8 or (depth - 2) % 6:
        raise ConfigError("depth", f"resnet depth must be {RESNET_DEPTHS}, got {depth}")
    stage_channels = (_units(16 * width), _units(32 * width), _units(64 * width))
    return CifarResNet(require_image_shape("resnet", input_shape)[0], num_classes, stage_channels, (depth - 2) // 6)


# ---------------------------------------------------------------- mobilenet_v2


class MobileNetV2Network(Network):
    """torchvision's MobileNetV2 (random init) seen through :class:`Network`; features = ``.features`` output."""

    feature_kind = "map"

    def __init__(self, in_channels: int, num_classes: int, width: float, dropout: float) -> None:
        super().__init__()
        from torchvision.models import mobilenet_v2 as torchvision_mobilenet_v2

        # weights=None: random initialisation, never a download.
        model = torchvision_mobilenet_v2(
            weights=None, width_mult=width, num_classes=num_classes, dropout=dropout
        )
        if in_channels != 3:
            stem = model.features[0][0]
            replacement = nn.Conv2d(
                in_channels,
                stem.out_channels,
                kernel_size=stem.kernel_size,
                stride=stem.stride,
                padding=stem.padding,
                bias=False,
            )
            nn.init.kaiming_normal_(replacement.weight, mode="fan_out")
            model.features[0][0] = replacement
        self.features = model.features
        self.classifier = model.classifier
        self.feature_dim = model.last_channel

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.features(x)
        pooled = torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)
        return self.classifier(pooled), features


@MODELS.register("mobilenet_v2")
def mobilenet_v2(
    input_shape: InputShape, num_classes: int, width: float, dropout: float = 0.2
) -> Network:
    """MobileNetV2 with ``width_mult=width``; channel counts are rounded to multiples of 8 by torchvision.

    It downsamples 32x, so 32x32 inputs give 1x1 feature maps.
    """
    if not _is_real(dropout) or not 0.0 <= dropout < 1.0:
        raise ConfigError("dropout", f"must be a number in [0, 1), got {dropout!r}")
    return MobileNetV2Network(require_image_shape("mobilenet_v2", input_shape)[0], num_classes, width, float(dropout))
