"""The model families of kdtune.core.cifar_models and kdtune.core.torchvision_models, and the size metrics.

Expected parameter counts are published numbers (RepDistiller's CIFAR-100
table, torchvision's weight metadata) or formulas written out here, never read
from the models themselves.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from kdtune.core import cifar_models, torchvision_models
from kdtune.errors import ConfigError
from kdtune.core.model_checks import check_family_input
from kdtune.models import MODELS, build_feature_adapter, build_model, count_parameters, model_size_bytes
from kdtune.core.size_metrics import count_macs, model_size_metrics

CIFAR = (3, 32, 32)
FASHION = (1, 28, 28)

# Tian et al. 2020 (CRD / RepDistiller), Tables 1-2, parameters in millions for CIFAR-100.
REPDISTILLER_MILLIONS = {
    "resnet20": 0.28,
    "resnet32": 0.47,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_40_2": 2.26,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "vgg13": 9.46,
    "vgg8": 3.96,
}


@pytest.mark.parametrize("family, millions", sorted(REPDISTILLER_MILLIONS.items()))
def test_cifar_families_have_repdistillers_published_size(family, millions):
    model = build_model(family, CIFAR, 100, 1.0)
    # The table rounds some sizes and truncates others (wrn_40_2 2,255,156 -> 2.26, vgg8 3,965,028 -> 3.96).
    assert abs(count_parameters(model) / 1e6 - millions) < 0.01


def _resnet8_parameters(stem: int, c1: int, c2: int, c3: int, in_channels: int, classes: int) -> int:
    """ResNet-8 (one block per stage) with projection shortcuts, counted layer by layer; BN has 2 per channel."""
    conv3 = lambda cin, cout: 9 * cin * cout  # noqa: E731
    total = conv3(in_channels, stem) + 2 * stem
    for cin, cout, stride in ((stem, c1, 1), (c1, c2, 2), (c2, c3, 2)):
        total += conv3(cin, cout) + conv3(cout, cout) + 4 * cout
        if stride != 1 or cin != cout:
            total += cin * cout + 2 * cout  # 1x1 conv + BN
    return total + c3 * classes + classes


@pytest.mark.parametrize(
    "family, width, channels",
    [
        ("resnet8", 1.0, (16, 16, 32, 64)),
        ("resnet8", 0.25, (4, 4, 8, 16)),
        ("resnet8", 2.5, (40, 40, 80, 160)),
        ("resnet8x4", 0.5, (16, 32, 64, 128)),
    ],
)
def test_resnet8_width_scales_every_channel_count(family, width, channels):
    model = build_model(family, FASHION, 10, width)
    assert count_parameters(model) == _resnet8_parameters(*channels, in_channels=1, classes=10)


def test_wrn_family_options_match_the_named_variants():
    named = build_model("wrn_16_2", CIFAR, 100, 1.0)
    generic = build_model("wrn", CIFAR, 100, 1.0, depth=16, widen=2)
    assert count_parameters(named) == count_parameters(generic)
    with pytest.raises(ConfigError) as info:
        build_model("wrn", CIFAR, 10, 1.0, depth=18)
    assert info.value.field == "depth" and "6n+4" in str(info.value)


def test_vgg_width_divides_channels_and_depth_is_checked():
    # vgg8 at width 1/8: five conv3x3(+bias)+BN stages of 8/16/32/64/64 channels, Linear 64 -> 10.
    channels = (8, 16, 32, 64, 64)
    expected, previous = 0, 1
    for c in channels:
        expected += 9 * previous * c + c + 2 * c
        previous = c
    expected += 64 * 10 + 10
    assert count_parameters(build_model("vgg", FASHION, 10, 0.125)) == expected
    with pytest.raises(ConfigError) as info:
        build_model("vgg", CIFAR, 10, 1.0, depth=10)
    assert info.value.field == "depth" and "8, 11, 13, 16, 19" in str(info.value)


# torchvision's weight metadata (num_params), ImageNet: 3 channels, 224 px stem, 1000 classes.
TORCHVISION_PARAMETERS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "mobilenet_v3_small": 2_542_856,
    "mobilenet_v3_large": 5_483_032,
    "efficientnet_b0": 5_288_548,
    "regnet_x_400mf": 5_495_976,
    "regnet_y_400mf": 4_344_144,
}


def test_torchvision_families_cover_the_published_table():
    assert sorted(TORCHVISION_PARAMETERS) == sorted(torchvision_models.TORCHVISION_FAMILIES)


@pytest.mark.parametrize("family, expected", sorted(TORCHVISION_PARAMETERS.items()))
def test_torchvision_families_have_the_published_imagenet_size(family, expected):
    model = build_model(family, (3, 224, 224), 1000, 1.0)
    assert count_parameters(model) == expected


def test_resnet18_small_input_stem_is_a_3x3_conv_without_max_pool():
    # From ImageNet's 11,689,512: the 7x7x3x64 stem becomes 3x3x1x64, the 1000-way head a 10-way one.
    model = build_model("resnet18", FASHION, 10, 1.0)
    assert count_parameters(model) == 11_689_512 - 7 * 7 * 3 * 64 + 3 * 3 * 1 * 64 - (512 * 1000 + 1000) + (512 * 10 + 10)
    with torch.no_grad():
        _, features = model.eval().forward_features(torch.zeros(1, *FASHION))
    # Stride 1 stem, no max-pool, then three stride-2 stages: 28 -> 14 -> 7 -> 4.
    assert tuple(features.shape) == (1, 512, 4, 4)
    imagenet_style = build_model("resnet18", FASHION, 10, 1.0, small_input=False)
    with torch.no_grad():
        _, features = imagenet_style.eval().forward_features(torch.zeros(1, *FASHION))
    assert tuple(features.shape) == (1, 512, 1, 1)


def test_torchvision_families_have_no_width_knob():
    with pytest.raises(ConfigError) as info:
        build_model("resnet18", CIFAR, 10, 0.5)
    assert info.value.field == "width" and "width must be 1" in str(info.value)


# One step of training on each family's intended input, small widths where there is a knob.
STEP_CASES = [
    ("resnet8", FASHION, 0.25, {}),
    ("resnet32x4", CIFAR, 0.125, {}),
    ("wrn", FASHION, 0.25, {"depth": 10, "widen": 2}),
    ("vgg", FASHION, 0.125, {"depth": 11}),
    ("vgg8", (1, 8, 8), 0.125, {}),
    ("mobilenet_v3_small", CIFAR, 1.0, {}),
    ("efficientnet_b0", CIFAR, 1.0, {}),
    ("regnet_x_400mf", CIFAR, 1.0, {}),
    ("resnet18", FASHION, 1.0, {}),
    ("timm", FASHION, 1.0, {"name": "resnet10t"}),
]


@pytest.mark.parametrize("family, shape, width, options", STEP_CASES, ids=[c[0] for c in STEP_CASES])
def test_one_training_step_lowers_the_loss_and_features_match_feature_dim(family, shape, width, options):
    torch.manual_seed(0)
    model = build_model(family, shape, 10, width, **options).train()
    x, y = torch.randn(2, *shape), torch.tensor([0, 1])

    def loss_and_features() -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(1)  # the same dropout masks in both passes
        logits, features = model.forward_features(x)
        return F.cross_entropy(logits, y), features

    loss, features = loss_and_features()
    assert features.shape[0] == 2 and features.shape[1] == model.feature_dim
    assert features.dim() == (2 if model.feature_kind == "vector" else 4)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-3 * p.grad / (p.grad.norm() + 1e-12)  # a small normalised gradient step
        after, _ = loss_and_features()
    assert after < loss


def test_every_family_of_these_modules_has_a_step_case():
    here = {cifar_models.__name__, torchvision_models.__name__}
    families = {name for name in MODELS.names() if MODELS.get(name).__module__ in here}
    stepped = {case[0] for case in STEP_CASES}
    # Named variants share their generic family's code (resnet8 ... resnet110, wrn_d_k, vgg8 ... vgg19).
    covered_by_generic = (
        set(cifar_models.CIFAR_RESNETS) | {n for n in families if n.startswith(("wrn_", "vgg"))}
        | set(torchvision_models.TORCHVISION_FAMILIES)
    )
    assert families - stepped <= covered_by_generic
    assert families >= set(REPDISTILLER_MILLIONS) | set(TORCHVISION_PARAMETERS) | {"wrn", "vgg", "timm"}


def test_student_features_map_onto_a_teachers_for_feature_distillation():
    student = build_model("resnet8", CIFAR, 100, 0.5).eval()
    teacher = build_model("resnet32x4", CIFAR, 100, 0.25).eval()
    x = torch.randn(2, *CIFAR)
    with torch.no_grad():
        _, s_features = student.forward_features(x)
        _, t_features = teacher.forward_features(x)
    adapter = build_feature_adapter(student, teacher.feature_dim)
    # Both downsample 4x: 8x8 maps of 32 and 64 channels.
    assert tuple(s_features.shape) == (2, 32, 8, 8) and tuple(t_features.shape) == (2, 64, 8, 8)
    assert adapter(s_features).shape == t_features.shape


def test_timm_family_builds_published_resnet18_and_explains_a_missing_install(monkeypatch):
    pytest.importorskip("timm")
    model = build_model("timm", (3, 224, 224), 1000, 1.0, name="resnet18")
    assert count_parameters(model) == 11_689_512  # the same network as torchvision's
    with pytest.raises(ConfigError) as info:
        build_model("timm", CIFAR, 10, 1.0, name="no_such_net")
    assert info.value.field == "name"
    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` meets when it is not installed
    with pytest.raises(ConfigError) as info:
        build_model("timm", CIFAR, 10, 1.0)
    assert "pip install 'kdtune[timm]'" in str(info.value)


# --- warnings for a family on images it was not made for -------------------------------------


def test_cnn_family_on_28px_images_is_warned_about():
    (warning,) = check_family_input("cnn", FASHION)
    assert "'cnn'" in warning and "28x28" in warning and "resnet8" in warning
    assert check_family_input("cnn", (1, 8, 8)) == []
    assert check_family_input("resnet8", FASHION) == []
    with pytest.raises(ConfigError):
        check_family_input("no_such_family", FASHION)


# --- size metrics -----------------------------------------------------------------------------


def test_macs_of_the_cnn_family_follow_the_conv_formula():
    c = 8
    model = build_model("cnn", FASHION, 10, c)
    # conv 1->c and c->2c at 28x28, max-pool, conv 2c->2c at 14x14, Linear 2c->10.
    expected = 9 * 1 * c * 28 * 28 + 9 * c * 2 * c * 28 * 28 + 9 * 2 * c * 2 * c * 14 * 14 + 2 * c * 10
    assert count_macs(model, FASHION) == expected


def test_model_size_metrics_reports_all_four_sizes():
    model = build_model("resnet8", FASHION, 10, 0.25)
    metrics = model_size_metrics(model, FASHION, repeats=3)
    assert metrics["params"] == _resnet8_parameters(4, 4, 8, 16, in_channels=1, classes=10)
    assert metrics["bytes"] == model_size_bytes(model)
    assert metrics["macs"] == count_macs(model, FASHION) > metrics["params"]
    assert metrics["latency_ms"] > 0
    assert model_size_metrics(model, FASHION, latency=False)["latency_ms"] is None
    assert model.training  # measured on a copy
