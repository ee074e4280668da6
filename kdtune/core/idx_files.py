"""IDX files (the MNIST family's format), read with numpy, gzipped or not.

An IDX file is a big-endian header (two zero bytes, a type code, the number of
dimensions, then each dimension as a uint32) followed by the raw values. MNIST
and Fashion-MNIST ship as ``.gz`` of such files; torchvision unpacks them under
``root/<Class>/raw/``; Debian's ``dataset-mnist`` / ``dataset-fashion-mnist``
install the ``.gz`` files in one folder (``/usr/share/datasets/fashion-mnist/``).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from kdtune.errors import ConfigError

#: IDX type code -> big-endian numpy dtype.
IDX_DTYPES: dict[int, str] = {
    0x08: ">u1",
    0x09: ">i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}

#: The four files of MNIST-like datasets, without the ``.gz`` suffix.
MNIST_FILE_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in IDX file ``path`` (gzipped when it ends in ``.gz``), in native byte order.

    Raises :class:`ConfigError` (field ``data.root``) naming the file when the
    header is malformed or the data is shorter or longer than the header says.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # gzip raises BadGzipFile (an OSError) or EOFError when truncated
        raise ConfigError("data.root", f"{path}: cannot read ({type(exc).__name__}: {exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ConfigError(
            "data.root", f"{path}: not an IDX file (expected magic 00 00 <type> <ndim>, found {raw[:4].hex(' ')})"
        )
    dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError("data.root", f"{path}: IDX header announces {ndim} dimensions but the file ends early")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ConfigError(
            "data.root",
            f"{path}: IDX header says shape {shape} ({expected} bytes of data), the file holds {len(raw) - header}",
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def mnist_file_candidates(root: str | Path, torchvision_folder: str) -> dict[str, list[Path]]:
    """For each of the four files, where it may lie under ``root``, in the order they are tried.

    torchvision's unpacked layout ``root/<torchvision_folder>/raw/<file>`` first,
    then the files as shipped in ``root`` itself (``<file>.gz``, or unpacked).
    """
    base = Path(root).expanduser()
    raw = base / torchvision_folder / "raw"
    return {
        name: [raw / name, raw / f"{name}.gz", base / f"{name}.gz", base / name] for name in MNIST_FILE_NAMES
    }


def find_mnist_files(root: str | Path, torchvision_folder: str) -> dict[str, Path] | None:
    """The path of each of the four files under ``root`` (see :func:`mnist_file_candidates`), or None if any is missing."""
    found: dict[str, Path] = {}
    for name, candidates in mnist_file_candidates(root, torchvision_folder).items():
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return None
        found[name] = path
    return found
