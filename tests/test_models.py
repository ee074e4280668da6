"""Model families: shapes, parameter counts, sizes on disk, adapters and config errors."""

from __future__ import annotations

import pytest
import torch

from kdtune.errors import ConfigError
from kdtune.models import (
    MODELS,
    build_feature_adapter,
    build_model,
    count_parameters,
    model_size_bytes,
)

DIGITS = (1, 8, 8)
CIFAR = (3, 32, 32)
NUM_CLASSES = 10


def _images(shape: tuple[int, int, int], batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, *shape, generator=generator)


# (family, input shape, width, options, expected feature shape for a batch of 2), each
# written from the architecture's definition rather than read from the model.
SHAPE_CASES = [
    ("mlp", DIGITS, 16, {}, (2, 16)),
    ("mlp", CIFAR, 16, {"depth": 3}, (2, 16)),
    # cnn: last conv has 2c channels; 8x8 and 32x32 are max-pooled once.
    ("cnn", DIGITS, 4, {}, (2, 8, 4, 4)),
    ("cnn", CIFAR, 4, {}, (2, 8, 16, 16)),
    # resnet: 64·width channels after two stride-2 stages.
    ("resnet", DIGITS, 0.5, {"depth": 8}, (2, 32, 2, 2)),
    ("resnet", CIFAR, 0.5, {}, (2, 32, 8, 8)),
    # mobilenet_v2: 1280 channels (width <= 1), 32x downsampling.
    ("mobilenet_v2", CIFAR, 0.5, {}, (2, 1280, 1, 1)),
]


@pytest.mark.parametrize("family, shape, width, options, feature_shape", SHAPE_CASES)
def test_output_and_feature_shapes(family, shape, width, options, feature_shape):
    torch.manual_seed(0)
    model = build_model(family, shape, NUM_CLASSES, width, **options).eval()
    x = _images(shape)
    with torch.no_grad():
        logits = model(x)
        logits_again, features = model.forward_features(x)
    assert logits.shape == (2, NUM_CLASSES)
    assert tuple(features.shape) == feature_shape
    assert model.feature_dim == feature_shape[1]
    assert model.feature_kind == ("vector" if len(feature_shape) == 2 else "map")
    torch.testing.assert_close(logits_again, logits, rtol=0, atol=0)


def test_every_registered_family_is_covered_by_the_shape_tests():
    # Other test modules register their own families (named "*_test") in the
    # same session, and families defined in other kdtune modules have their own
    # tests (test_model_families.py); the families defined here must have shape cases.
    shipped = [
        name for name in MODELS.names()
        if not name.endswith("_test") and MODELS.get(name).__module__ == build_model.__module__
    ]
    assert sorted({case[0] for case in SHAPE_CASES}) == shipped


@pytest.mark.parametrize("width", [1, 4, 32])
def test_mlp_parameter_count_matches_formula(width):
    model = build_model("mlp", DIGITS, NUM_CLASSES, width)
    w, inputs = width, 64
    expected = (inputs * w + w) + (w * w + w) + (w * NUM_CLASSES + NUM_CLASSES)
    assert count_parameters(model) == expected


def test_mlp_depth_adds_square_hidden_layers_and_width_is_rounded():
    model = build_model("mlp", CIFAR, NUM_CLASSES, 7.6, depth=4)
    w, inputs = 8, 3 * 32 * 32
    expected = (inputs * w + w) + 3 * (w * w + w) + (w * NUM_CLASSES + NUM_CLASSES)
    assert count_parameters(model) == expected


def test_count_parameters_includes_frozen_parameters():
    model = build_model("mlp", DIGITS, NUM_CLASSES, 4)
    total = count_parameters(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    assert count_parameters(model) == total == 64 * 4 + 4 + 4 * 4 + 4 + 4 * 10 + 10


@pytest.mark.parametrize(
    "family, widths, options",
    [
        ("mlp", [2, 4, 8, 16], {}),
        ("cnn", [1, 2, 4, 8], {}),
        ("resnet", [0.25, 0.5, 1.0, 1.5], {"depth": 8}),
        ("mobilenet_v2", [0.25, 0.5, 1.0], {}),
    ],
)
def test_parameter_count_strictly_increases_with_width(family, widths, options):
    shape = CIFAR if family == "mobilenet_v2" else DIGITS
    counts = [count_parameters(build_model(family, shape, NUM_CLASSES, w, **options)) for w in widths]
    assert all(smaller < larger for smaller, larger in zip(counts, counts[1:])), counts


def test_resnet20_at_width_one_has_the_published_size():
    # He et al. (2016), Table 6: ResNet-20 on CIFAR-10 has 0.27M parameters.
    model = build_model("resnet", CIFAR, NUM_CLASSES, 1.0)
    assert 0.26e6 < count_parameters(model) < 0.28e6


def test_model_size_of_float32_mlp_is_four_bytes_per_parameter():
    model = build_model("mlp", DIGITS, NUM_CLASSES, 12)
    assert model_size_bytes(model) == 4 * count_parameters(model)
    assert model_size_bytes(model.half()) == 2 * count_parameters(model)


def test_model_size_of_cnn_adds_batchnorm_buffers():
    c = 3
    model = build_model("cnn", DIGITS, NUM_CLASSES, c)
    parameter_names = {name for name, _ in model.named_parameters()}
    buffer_bytes = sum(
        t.numel() * t.element_size()
        for name, t in model.state_dict().items()
        if name not in parameter_names
    )
    # Three BatchNorms over c, 2c, 2c channels: float32 running mean and variance,
    # plus one int64 num_batches_tracked each.
    assert buffer_bytes == 2 * (c + 2 * c + 2 * c) * 4 + 3 * 8
    assert model_size_bytes(model) == 4 * count_parameters(model) + buffer_bytes


def test_model_size_matches_a_saved_state_dict(tmp_path):
    model = build_model("cnn", DIGITS, NUM_CLASSES, 8)
    path = tmp_path / "cnn.pt"
    torch.save(model.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    assert sum(t.numel() * t.element_size() for t in loaded.values()) == model_size_bytes(model)
    # The file adds only a small container overhead on top of the tensor bytes.
    assert model_size_bytes(model) < path.stat().st_size < model_size_bytes(model) + 16_384


@pytest.mark.parametrize(
    "student_spec, teacher_spec, shape",
    [
        (("mlp", 8, {}), ("mlp", 64, {}), DIGITS),
        (("cnn", 2, {}), ("cnn", 16, {}), DIGITS),
        (("resnet", 0.25, {"depth": 8}), ("resnet", 1.0, {"depth": 14}), CIFAR),
    ],
)
def test_adapter_maps_student_features_to_teacher_feature_shape(student_spec, teacher_spec, shape):
    torch.manual_seed(0)
    student = build_model(student_spec[0], shape, NUM_CLASSES, student_spec[1], **student_spec[2]).eval()
    teacher = build_model(teacher_spec[0], shape, NUM_CLASSES, teacher_spec[1], **teacher_spec[2]).eval()
    x = _images(shape)
    with torch.no_grad():
        _, student_features = student.forward_features(x)
        _, teacher_features = teacher.forward_features(x)
    adapter = build_feature_adapter(student, teacher.feature_dim)
    assert student_features.shape != teacher_features.shape
    assert adapter(student_features).shape == teacher_features.shape
    # A Linear for vectors, a 1x1 conv for maps: (in + 1 bias) · out parameters either way.
    assert count_parameters(adapter) == (student.feature_dim + 1) * teacher.feature_dim


def _config_error(call) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        call()
    return caught.value


def test_unknown_family_lists_allowed_families():
    error = _config_error(lambda: build_model("transformer", DIGITS, NUM_CLASSES, 8))
    assert error.field == "model"
    assert "transformer" in str(error)
    for name in ("mlp", "cnn", "resnet", "mobilenet_v2"):
        assert name in str(error)


@pytest.mark.parametrize("width", [0, -1.5, float("nan")])
def test_width_must_be_positive(width):
    error = _config_error(lambda: build_model("mlp", DIGITS, NUM_CLASSES, width))
    assert error.field == "width"
    assert "> 0" in str(error)


def test_unknown_option_names_option_and_allowed_ones():
    error = _config_error(lambda: build_model("mlp", DIGITS, NUM_CLASSES, 8, dropout=0.1))
    assert error.field == "dropout"
    assert "allowed options: depth" in str(error)

    error = _config_error(lambda: build_model("cnn", DIGITS, NUM_CLASSES, 8, depth=3))
    assert error.field == "depth"
    assert "allowed options: none" in str(error)


@pytest.mark.parametrize("depth", [21, 2, 0, "20"])
def test_bad_resnet_depth_names_allowed_depths(depth):
    error = _config_error(lambda: build_model("resnet", CIFAR, NUM_CLASSES, 1.0, depth=depth))
    assert error.field == "depth"
    assert "6n+2" in str(error) and "20" in str(error)


def test_bad_mlp_depth_is_a_config_error():
    error = _config_error(lambda: build_model("mlp", DIGITS, NUM_CLASSES, 8, depth=0))
    assert error.field == "depth"
    assert ">= 1" in str(error)


def test_mobilenet_takes_single_channel_images():
    model = build_model("mobilenet_v2", (1, 32, 32), NUM_CLASSES, 0.25).eval()
    with torch.no_grad():
        logits = model(_images((1, 32, 32)))
    assert logits.shape == (2, NUM_CLASSES)
    assert model.features[0][0].in_channels == 1


def test_numpy_integers_are_accepted_for_sizes():
    np = pytest.importorskip("numpy")
    labels = np.array([0, 3, 9])
    model = build_model("mlp", tuple(np.array(DIGITS)), labels.max() + 1, np.float64(4.0), depth=np.int64(1))
    assert count_parameters(model) == 64 * 4 + 4 + 4 * 10 + 10
