"""How big a network is, four ways: parameters, bytes, multiply-accumulates, measured latency.

A deployment team ranks students by latency or by the arithmetic of one
forward pass, not by parameter count: a wide shallow net and a narrow deep one
of equal size differ several-fold in both. :func:`model_size_metrics` gives all
four for one model and input shape, so any of them can be a size objective.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdtune.core.models import count_parameters, model_size_bytes

#: The keys :func:`model_size_metrics` returns.
SIZE_METRICS = ("params", "bytes", "macs", "latency_ms")


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on a single sample of ``input_shape``
    (``(C, H, W)`` for an image).

    Counted by PyTorch's FlopCounterMode (convolutions, matrix products and
    attention; each multiply-add is two FLOPs, so MACs = FLOPs / 2). Elementwise
    work (BatchNorm, activations, pooling) is not counted, as is usual for MACs.
    The model is evaluated in eval mode on a CPU copy; the model itself is untouched.
    """
    probe = copy.deepcopy(model).cpu().eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        probe(torch.zeros(1, *input_shape))
    return int(counter.get_total_flops()) // 2


def measure_latency_ms(
    model: nn.Module, input_shape: tuple[int, int, int], repeats: int = 30, warmup: int = 5, threads: int | None = 1
) -> float:
    """Median wall time in milliseconds of one batch-1 forward pass on the CPU (eval mode, no autograd).

    ``threads`` sets torch's intra-op threads while measuring (1 by default: a
    deployment-like figure that does not depend on how busy the other cores are);
    None keeps the current setting. The median of ``repeats`` timed passes after
    ``warmup`` untimed ones resists the outliers of a shared machine.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    probe = copy.deepcopy(model).cpu().eval()
    x = torch.randn(1, *input_shape)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        times = []
        with torch.inference_mode():
            for i in range(warmup + repeats):
                started = time.perf_counter()
                probe(x)
                if i >= warmup:
                    times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(previous_threads)
    return 1000.0 * statistics.median(times)


def model_size_metrics(
    model: nn.Module, input_shape: tuple[int, int, int], *, latency: bool = True, repeats: int = 30
) -> dict[str, Any]:
    """``params``, ``bytes`` (state_dict), ``macs`` (one image) and ``latency_ms`` (batch 1, CPU, median).

    ``latency=False`` skips the timing (``latency_ms`` is then None): the other
    three are exact and cheap, the latency takes ``repeats`` forward passes.
    """
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (channels, height, width), got {input_shape!r}")
    return {
        "params": count_parameters(model),
        "bytes": model_size_bytes(model),
        "macs": count_macs(model, shape),  # type: ignore[arg-type]
        "latency_ms": measure_latency_ms(model, shape, repeats=repeats) if latency else None,  # type: ignore[arg-type]
    }
