"""The formats ``kdtune export`` writes, without importing torch (the CLI lists them in ``--help``)."""

from __future__ import annotations

#: Export formats and the file suffix each gets by default; the first is the default format.
FORMATS = {"pt2": ".pt2", "state_dict": ".pt", "torchscript": ".ts", "onnx": ".onnx"}
DEFAULT_FORMAT = next(iter(FORMATS))
#: Formats whose runtime says it is deprecated upstream (torch 2.14: "torch.jit.load is deprecated").
DEPRECATED_FORMATS = {"torchscript": "deprecated upstream in favour of torch.export (--format pt2)"}
