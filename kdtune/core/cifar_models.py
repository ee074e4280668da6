"""The CIFAR networks of the knowledge-distillation literature, as kdtune model families.

These are the architectures of RepDistiller (Tian et al., "Contrastive
Representation Distillation", ICLR 2020), which the later logit-distillation
papers (DKD, MLKD, logit standardization, DIST, ...) reuse, under the names
people look for. At ``width=1`` every family has RepDistiller's published size
(100 classes): resnet56 0.86M, resnet110 1.74M, resnet8x4 1.23M, resnet32x4
7.43M, wrn_40_2 2.26M, wrn_16_2 0.70M, vgg8 3.96M, vgg13 9.46M parameters.

- ``resnet8`` ... ``resnet110``, ``resnet8x4``, ``resnet32x4``: CIFAR ResNets with
  a 1x1-conv projection shortcut where the shape changes (RepDistiller's; the
  older ``resnet`` family keeps He et al.'s parameter-free shortcut).
- ``wrn`` (options ``depth`` = 6n+4, ``widen``), and ``wrn_40_2``, ``wrn_40_1``,
  ``wrn_16_2``, ``wrn_16_1``: pre-activation wide ResNets (Zagoruyko & Komodakis 2016).
- ``vgg`` (option ``depth`` in 8, 11, 13, 16, 19), and ``vgg8`` ... ``vgg19``:
  VGG with BatchNorm, max-pool downsampling between stages, global average pool
  and one Linear (RepDistiller's ``vgg*_bn``).

``width`` multiplies every channel count (rounded, at least one channel), so a
width-scaled student of any of these shapes is one spec line. Features are the
final feature maps before global pooling (``feature_kind="map"``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdtune.errors import ConfigError
from kdtune.core.models import MODELS, BasicBlock, InputShape, ModelFactory, Network, _check_depth_option, _units


def _scaled(channels: Sequence[int], width: float) -> list[int]:
    return [_units(c * width) for c in channels]


def _kaiming_init(model: nn.Module) -> None:
    # He initialisation of every conv, BatchNorm at identity: RepDistiller's initialisation.
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def _pooled(features: Tensor) -> Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(features, 1), 1)


# ---------------------------------------------------------------- ResNets (RepDistiller)


class ProjectionBlock(BasicBlock):
    """Basic block (conv-BN-ReLU-conv-BN, add, ReLU) whose shortcut is a 1x1 conv + BN when the shape changes.

    The same layers as :class:`kdtune.models.BasicBlock`, whose shortcut is parameter-free instead.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(in_channels, out_channels, stride)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class StagedNetwork(Network):
    """``stem``, three stages of ``blocks`` blocks (the first of stages 2 and 3 strides 2), ``tail``, pool, Linear.

    ``channels`` is the stem's output followed by the three stages' channel counts;
    ``block(in_channels, out_channels, stride)`` builds one block.
    """

    feature_kind = "map"

    def __init__(
        self, stem: nn.Module, channels: Sequence[int], block: Callable[[int, int, int], nn.Module], blocks: int,
        tail: Sequence[nn.Module], num_classes: int,
    ) -> None:
        super().__init__()
        self.stem = stem
        previous, *stage_channels = channels
        layers: list[nn.Module] = []
        for index, out_channels in enumerate(stage_channels):
            for position in range(blocks):
                layers.append(block(previous, out_channels, 2 if index > 0 and position == 0 else 1))
                previous = out_channels
        self.stages = nn.Sequential(*layers, *tail)
        self.head = nn.Linear(previous, num_classes)
        self.feature_dim = previous
        _kaiming_init(self)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.stages(self.stem(x))
        return self.head(_pooled(features)), features


def projection_resnet(in_channels: int, num_classes: int, channels: Sequence[int], blocks: int) -> Network:
    """Stem conv3x3-BN-ReLU (``channels[0]``), three stages of ``blocks`` :class:`ProjectionBlock`, pool, Linear."""
    stem = nn.Sequential(
        nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True)
    )
    return StagedNetwork(stem, channels, ProjectionBlock, blocks, (), num_classes)


#: name -> (depth, stem + three stage channel counts at width 1), as RepDistiller defines them.
CIFAR_RESNETS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    **{f"resnet{depth}": (depth, (16, 16, 32, 64)) for depth in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}


def _cifar_resnet_factory(name: str, depth: int, channels: tuple[int, int, int, int]) -> ModelFactory:
    def factory(input_shape: InputShape, num_classes: int, width: float) -> Network:
        return projection_resnet(input_shape[0], num_classes, _scaled(channels, width), (depth - 2) // 6)

    factory.__name__ = name
    factory.__doc__ = (
        f"RepDistiller's {name}: {depth} layers, stem {channels[0]} and stages "
        f"{'/'.join(map(str, channels[1:]))} channels, each times ``width``."
    )
    return factory


for _name, (_depth, _channels) in CIFAR_RESNETS.items():
    MODELS.register(_name)(_cifar_resnet_factory(_name, _depth, _channels))


# ---------------------------------------------------------------- wide ResNets


class WideBlock(nn.Module):
    """Pre-activation block BN-ReLU-conv-BN-ReLU-conv; a 1x1 conv shortcut (from the activated input) when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated)), inplace=True))
        return out + (x if self.shortcut is None else self.shortcut(activated))


def wide_resnet(in_channels: int, num_classes: int, channels: Sequence[int], blocks: int) -> Network:
    """WRN: stem conv (``channels[0]``), three stages of ``blocks`` :class:`WideBlock`, BN-ReLU, pool, Linear."""
    stem = nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False)
    # The final BN-ReLU belongs to the features: pre-activation blocks leave their sum un-normalised.
    tail = (nn.BatchNorm2d(channels[-1]), nn.ReLU(inplace=True))
    return StagedNetwork(stem, channels, WideBlock, blocks, tail, num_classes)


WRN_DEPTHS = "6n+4 with n >= 1 (10, 16, 22, 28, 40, ...)"


@MODELS.register("wrn")
def wrn(input_shape: InputShape, num_classes: int, width: float, depth: int = 16, widen: int = 2) -> Network:
    """Wide ResNet WRN-``depth``-``widen``; ``width`` multiplies every channel count on top of ``widen``."""
    depth = _check_depth_option(depth, WRN_DEPTHS)
    if depth < 10 or (depth - 4) % 6:
        raise ConfigError("depth", f"wrn depth must be {WRN_DEPTHS}, got {depth}")
    if isinstance(widen, bool) or not isinstance(widen, int) or widen < 1:
        raise ConfigError("widen", f"must be an integer >= 1 (the WRN widening factor k), got {widen!r}")
    channels = _scaled((16, 16 * widen, 32 * widen, 64 * widen), width)
    return wide_resnet(input_shape[0], num_classes, channels, (depth - 4) // 6)


def _wrn_factory(depth: int, widen: int) -> ModelFactory:
    def factory(input_shape: InputShape, num_classes: int, width: float) -> Network:
        return wrn(input_shape, num_classes, width, depth=depth, widen=widen)

    factory.__name__ = f"wrn_{depth}_{widen}"
    factory.__doc__ = f"WRN-{depth}-{widen} (the ``wrn`` family with depth={depth}, widen={widen})."
    return factory


for _depth, _widen in ((40, 2), (40, 1), (16, 2), (16, 1)):
    MODELS.register(f"wrn_{_depth}_{_widen}")(_wrn_factory(_depth, _widen))


# ---------------------------------------------------------------- VGG

#: Convolutions per stage for each VGG depth (five stages at 64/128/256/512/512 channels).
VGG_STAGES: dict[int, tuple[int, int, int, int, int]] = {
    8: (1, 1, 1, 1, 1),
    11: (1, 1, 2, 2, 2),
    13: (2, 2, 2, 2, 2),
    16: (2, 2, 3, 3, 3),
    19: (2, 2, 4, 4, 4),
}
VGG_CHANNELS = (64, 128, 256, 512, 512)


class VGG(Network):
    """Five stages of conv3x3(+bias)-BN-ReLU, max-pooled 2x between the first four; global average pool, Linear.

    As in RepDistiller's CIFAR VGG, the pool between stages 4 and 5 is used only
    for inputs of 64 pixels or more, and a pool is skipped once the map is down
    to one pixel, so 8x8 to 32x32 inputs all work.
    """

    feature_kind = "map"

    def __init__(
        self, input_shape: InputShape, num_classes: int, channels: Sequence[int], convs: Sequence[int]
    ) -> None:
        super().__init__()
        in_channels, height, width_px = input_shape
        side = min(height, width_px)
        layers: list[nn.Module] = []
        previous = in_channels
        for stage, (out_channels, count) in enumerate(zip(channels, convs)):
            if stage > 0 and side >= 2 and (stage < 4 or min(height, width_px) >= 64):
                layers.append(nn.MaxPool2d(2))
                side //= 2
            for _ in range(count):
                layers += [
                    nn.Conv2d(previous, out_channels, 3, padding=1),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                ]
                previous = out_channels
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(previous, num_classes)
        self.feature_dim = previous
        _kaiming_init(self)
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.stages(x)
        return self.head(_pooled(features)), features


VGG_DEPTHS = ", ".join(map(str, VGG_STAGES))


@MODELS.register("vgg")
def vgg(input_shape: InputShape, num_classes: int, width: float, depth: int = 8) -> Network:
    """VGG-``depth`` with BatchNorm; stage channels ``64/128/256/512/512`` times ``width``."""
    depth = _check_depth_option(depth, VGG_DEPTHS)
    if depth not in VGG_STAGES:
        raise ConfigError("depth", f"vgg depth must be one of {VGG_DEPTHS}, got {depth}")
    return VGG(input_shape, num_classes, _scaled(VGG_CHANNELS, width), VGG_STAGES[depth])


def _vgg_factory(depth: int) -> ModelFactory:
    def factory(input_shape: InputShape, num_classes: int, width: float) -> Network:
        return vgg(input_shape, num_classes, width, depth=depth)

    factory.__name__ = f"vgg{depth}"
    factory.__doc__ = f"VGG-{depth} with BatchNorm (the ``vgg`` family with depth={depth})."
    return factory


for _depth in VGG_STAGES:
    MODELS.register(f"vgg{_depth}")(_vgg_factory(_depth))
