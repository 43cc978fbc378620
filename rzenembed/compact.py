"""Compact embeddings: nested prefixes and quantised codes, one definition for every user.

A vector store pays per dimension and per byte. A model trained with nested dimensions
(``loss.matryoshka``) keeps most of its quality in a prefix of its embedding; quantised
codes cut each component to one byte (``int8``, ``uint8``) or one bit (``binary``,
``ubinary``). The endpoint serves them, the evaluation scores them and the registration
records the calibration they need; all three go through this module, so the score a
report shows for "256 dimensions, int8" is the score of the codes the endpoint returns.

- **Prefix**: the first ``d`` components, renormalised to unit length.
- **int8 / uint8**: each component mapped linearly from its calibrated range
  ``[low, high]`` onto 256 levels (uint8 0..255; int8 the same levels minus 128), values
  outside the range clipped. Ranges are per component and per prefix length (a prefix is
  renormalised, so its components are larger than the full vector's) and come from a
  calibration set (``calibrate``), stored with the model as ``quantization.json``.
- **binary / ubinary**: one bit per component (1 where it is > 0), packed eight to a
  byte, most significant bit first (``numpy.packbits``); ubinary is the packed bytes,
  binary the same bytes minus 128 as int8.

How each precision ranks (what a vector store computes on the codes): float by the dot
product (cosine: vectors are unit length), int8 by the integer dot product of the codes,
uint8 the same after taking the offset of 128 back off (the same codes, so the same order
as int8), binary and ubinary by Hamming distance (fewer differing bits ranks higher; the
same bits, so the same order). ``comparable`` turns codes into float vectors whose dot
product gives exactly that order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PRECISIONS = ("float", "int8", "uint8", "binary", "ubinary")
CALIBRATED = ("int8", "uint8")  # precisions that need a calibration
CALIBRATION_FILE = "quantization.json"
CALIBRATION_FORMAT = 1
LEVELS = 255  # steps between low and high: 256 codes


class PrecisionError(ValueError):
    """A precision that does not exist, or that the model has no calibration for."""


def prefix(vectors: np.ndarray, dim: int | None) -> np.ndarray:
    """The first ``dim`` components of each row, renormalised to unit length (the rows
    unchanged when ``dim`` is None or the full size)."""
    vectors = np.asarray(vectors)
    if dim is None or dim == vectors.shape[1]:
        return vectors
    if not 0 < dim <= vectors.shape[1]:
        raise ValueError(f"a prefix of {dim} components of {vectors.shape[1]}-d vectors")
    head = vectors[:, :dim].astype(np.float32)
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    return head / np.maximum(norms, 1e-12)


def code_bytes(dim: int, precision: str) -> int:
    """Bytes of one vector of ``dim`` components at ``precision``."""
    check_precision(precision)
    if precision == "float":
        return 4 * dim
    if precision in CALIBRATED:
        return dim
    return (dim + 7) // 8


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return precision


@dataclass
class Calibration:
    """Per-component ranges of the embeddings, one pair of vectors per prefix length.

    ``ranges[d] = (low, high)``: the smallest and largest value of each component of the
    calibration embeddings' ``d``-prefix (renormalised). ``source`` says what they were
    computed on (data versions, rows, model digest)."""

    ranges: dict[int, tuple[np.ndarray, np.ndarray]]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def dimensions(self) -> list[int]:
        return sorted(self.ranges)

    def range_of(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        if dim not in self.ranges:
            raise PrecisionError(
                f"int8/uint8 are calibrated for dimensions {self.dimensions}; "
                f"{dim} is not one of them"
            )
        return self.ranges[dim]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CALIBRATION_FORMAT,
            "method": "per-component min and max of the calibration embeddings, per prefix",
            "source": self.source,
            "ranges": {
                str(d): {"low": low.tolist(), "high": high.tolist()}
                for d, (low, high) in sorted(self.ranges.items())
            },
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Calibration:
        if data.get("format") != CALIBRATION_FORMAT:
            raise ValueError(
                f"{CALIBRATION_FILE}: format {data.get('format')!r} is not supported "
                f"(expected {CALIBRATION_FORMAT})"
            )
        ranges = {}
        for key, pair in data["ranges"].items():
            low = np.asarray(pair["low"], dtype=np.float32)
            high = np.asarray(pair["high"], dtype=np.float32)
            if low.shape != (int(key),) or high.shape != (int(key),):
                raise ValueError(f"{CALIBRATION_FILE}: the ranges of {key} have another size")
            ranges[int(key)] = (low, high)
        return cls(ranges, dict(data.get("source") or {}))

    @classmethod
    def loads(cls, text: str | bytes) -> Calibration:
        return cls.from_json(json.loads(text))


def calibrate(
    vectors: np.ndarray, dims: Iterable[int], source: Mapping[str, Any] | None = None
) -> Calibration:
    """Ranges of ``vectors`` (calibration embeddings, full size) at each of ``dims`` below
    the full size and at the full size."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] < 2:
        raise ValueError("calibration needs at least two embeddings")
    full = vectors.shape[1]
    ranges = {}
    for d in sorted({d for d in dims if d < full} | {full}):  # sizes past the full one: none
        head = prefix(vectors, d)
        ranges[d] = (head.min(axis=0), head.max(axis=0))
    return Calibration(ranges, dict(source or {}))


def _levels(vectors: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """0..255 per component: ``low`` maps to 0, ``high`` to 255, outside clipped."""
    span = np.where(high > low, high - low, 1.0)
    steps = np.rint((vectors - low) / span * LEVELS)
    return np.clip(steps, 0, LEVELS)


def quantize(
    vectors: np.ndarray, precision: str, calibration: Calibration | None = None
) -> np.ndarray:
    """Codes of unit-length ``vectors`` (already cut to the wanted prefix): float32 rows
    for ``float``, int8/uint8 rows of the same width, or packed bits ((d + 7) // 8 bytes,
    int8 for ``binary``, uint8 for ``ubinary``)."""
    check_precision(precision)
    vectors = np.asarray(vectors, dtype=np.float32)
    if precision == "float":
        return vectors
    if precision in CALIBRATED:
        if calibration is None:
            raise PrecisionError(
                f"{precision} needs a calibration ({CALIBRATION_FILE}) and this model has none"
            )
        low, high = calibration.range_of(vectors.shape[1])
        levels = _levels(vectors, low, high)
        if precision == "uint8":
            return levels.astype(np.uint8)
        return (levels - 128).astype(np.int8)
    packed = np.packbits(vectors > 0, axis=1)
    return packed if precision == "ubinary" else (packed.astype(np.int16) - 128).astype(np.int8)


def comparable(codes: np.ndarray, precision: str, dim: int) -> np.ndarray:
    """float64 rows whose dot products order candidates as a store does on ``codes``:
    the values themselves (float; int8's integer dot product, exact in float64), uint8's
    less the offset of 128 (int8's codes again), or +-1 per bit for binary/ubinary
    (dot = dim - 2 x Hamming distance)."""
    check_precision(precision)
    if precision in ("binary", "ubinary"):
        raw = codes.astype(np.int16) + (128 if precision == "binary" else 0)
        bits = np.unpackbits(raw.astype(np.uint8), axis=1)[:, :dim]
        return bits.astype(np.float64) * 2.0 - 1.0
    return codes.astype(np.float64) - (128.0 if precision == "uint8" else 0.0)


def compact(
    vectors: np.ndarray,
    dim: int | None,
    precision: str,
    calibration: Calibration | None = None,
) -> np.ndarray:
    """``vectors`` cut to ``dim`` (renormalised) and coded at ``precision``."""
    return quantize(prefix(vectors, dim), precision, calibration)


def offered(precisions: Sequence[str], calibration: Calibration | None) -> list[str]:
    """``precisions`` less int8/uint8 when there is no calibration to code them with."""
    return [p for p in precisions if p not in CALIBRATED or calibration is not None]


def variant_key(dim: int, precision: str) -> str:
    """How reports name one (dimension, precision) pair: ``256/int8``."""
    return f"{dim}/{precision}"


def parse_variant(key: str) -> tuple[int, str]:
    dim, precision = key.split("/", 1)
    return int(dim), precision


def grid(dims: Sequence[int], full: int, precisions: Sequence[str]) -> list[tuple[int, str]]:
    """Every (dimension, precision) to score: each of ``dims`` below ``full`` and ``full``
    itself, at each precision, smallest dimension first."""
    sizes = sorted({d for d in dims if d < full} | {full})
    return [(d, check_precision(p)) for d in sizes for p in precisions]


def read_calibration(folder: str, endpoint_url: str | None = None) -> Calibration | None:
    """The calibration stored with the model at ``folder`` (a local path or a storage-root
    URI), or None when it has none."""
    from rzenembed.data.folders import exists, read_bytes
    from rzenembed.data.storage import join

    uri = join(folder, CALIBRATION_FILE)
    if not exists(uri, endpoint_url):
        return None
    return Calibration.loads(read_bytes(uri, endpoint_url))


def trained_dimensions(extra: Mapping[str, Any]) -> list[int]:
    """The nested dimensions a model card's ``extra`` says the model was trained for."""
    return [int(d) for d in (extra.get("matryoshka") or {}).get("dims", [])]
