"""Why kdtune's 8x8 ``cnn`` family loses validation accuracy on 28x28 Fashion-MNIST while its training loss falls.

A plain PyTorch loop (Adam 1e-3, batch 128, as in issue 14) on kdtune's
tensors. After every epoch the same weights are scored on the validation split
four ways:

- ``eval``: BatchNorm with its running statistics (what kdtune reports);
- ``batch``: BatchNorm with the statistics of each 500-image validation batch;
- ``recal``: running statistics recomputed as exact averages over 10,000
  training images with the final weights (``momentum=None``), then eval mode;
- ``train_eval``: eval mode on 5,000 training images (overfitting check).

It also prints, for every BatchNorm, how far its running mean is from the
recalibrated one, in units of the recalibrated std, and the spread of the
pooled features across images against their mean (how much of the logit is
image-specific).

    PYTHONPATH=. python bench/cnn_batchnorm.py --root /usr/share/datasets/fashion-mnist --width 32 --epochs 4
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from kdtune.data import load_dataset
from kdtune.models import build_model


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train_mode_bn: bool = False) -> float:
    model = copy.deepcopy(model)
    model.train(train_mode_bn)
    if train_mode_bn:  # batch statistics, but leave no trace in the running ones
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.track_running_stats = False
                m.running_mean = m.running_var = None
    correct = 0
    with torch.no_grad():
        for start in range(0, len(x), 500):
            correct += (model(x[start : start + 500]).argmax(1) == y[start : start + 500]).sum().item()
    return correct / len(x)


def recalibrated(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over all batches
    model.train()
    with torch.no_grad():
        for start in range(0, len(x), 500):
            model(x[start : start + 500])
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--family", default="cnn")
    parser.add_argument("--width", type=float, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-images", type=int, default=0, help="0: the whole training split")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_dataset("fashion_mnist", args.root)
    x, y = data.train.x, data.train.y
    if args.train_images:
        x, y = x[: args.train_images], y[: args.train_images]
    model = build_model(args.family, data.input_shape, data.num_classes, args.width)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    print(f"{args.family} width {args.width}, {len(x)} training images, torch threads {torch.get_num_threads()}")
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), 128):
            idx = order[start : start + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        seconds = time.perf_counter() - started
        recal = recalibrated(model, x[:10_000])
        print(
            f"epoch {epoch}: train loss {total / len(x):.3f} ({seconds:.0f} s); val acc eval "
            f"{accuracy(model, data.val.x, data.val.y):.3f}, batch "
            f"{accuracy(model, data.val.x, data.val.y, train_mode_bn=True):.3f}, recal "
            f"{accuracy(recal, data.val.x, data.val.y):.3f}; train acc eval "
            f"{accuracy(model, x[:5000], y[:5000]):.3f}",
            flush=True,
        )
        for (name, bn), (_, ref) in zip(
            ((n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)),
            ((n, m) for n, m in recal.named_modules() if isinstance(m, nn.BatchNorm2d)),
        ):
            shift = ((bn.running_mean - ref.running_mean).abs() / ref.running_var.sqrt()).max().item()
            ratio = (bn.running_var / ref.running_var).max().item()
            print(f"    {name}: max |running - recal| mean shift {shift:.2f} std; max var ratio {ratio:.2f}")
    model.eval()
    with torch.no_grad():
        _, features = model.forward_features(data.val.x[:2000])
        pooled = features.mean(dim=(2, 3))
    spread = (pooled.std(0) / pooled.mean(0).abs().clamp_min(1e-6)).median().item()
    print(f"pooled features: median over channels of (std across images / |mean|) = {spread:.3f}")


if __name__ == "__main__":
    main()
