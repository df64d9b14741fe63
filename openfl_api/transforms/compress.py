"""Compressors: fewer bytes per upload, for real (sparse or packed payload entries).

Each works on the flat update vector (:mod:`openfl_api.transforms.layout`) and puts its own
entries on the wire:

- :class:`TopK`: the ``k`` largest ``|x_i|`` as ``wire/indices`` (int32, sorted) and
  ``wire/values`` (float32): ``8 k`` bytes; with error feedback the rest is kept by the frontend
  and added to its next update (Stich et al., 2018; Karimireddy et al., 2019).
- :class:`QSGD`: stochastic rounding to ``s = 2**(bits-1) - 1`` signed levels per bucket with a
  max-abs scale (Alistarh et al., 2017): ``wire/scales`` (float32 per bucket) and ``wire/levels``
  (``bits`` bits per coordinate, packed into bytes). Unbiased.
- :class:`Cast`: the vector in float16 or bfloat16, ``wire/delta``: half the bytes.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import torch

from openfl_api.errors import ConfigurationError, PayloadError
from openfl_api.payload import TensorSpec
from openfl_api.transforms.base import Stage, Transform, check_int, check_number
from openfl_api.transforms.layout import WIRE

__all__ = ["Compressor", "TopK", "QSGD", "Cast"]


class Compressor(Transform):
    """A transform that encodes the update in fewer bytes on the frontend and decodes it on the backend."""

    stage = Stage.COMPRESS
    #: Relative rounding of one coordinate (a Clip before a compressor leaves room for it).
    unit_roundoff = 0.0
    #: True when the frontend keeps what was not sent and adds it to its next update.
    error_feedback = False

    def specs(self, size: int) -> List[TensorSpec]:
        """The payload entries of an update of ``size`` coordinates."""
        raise NotImplementedError

    def encode(self, vector: torch.Tensor, generator: torch.Generator) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """Return the payload entries and the vector the backend will decode from them."""
        raise NotImplementedError

    def decode(self, pieces: Dict[str, torch.Tensor], size: int) -> torch.Tensor:
        """The float32 vector of ``size`` coordinates that ``pieces`` encode.

        Raises:
            PayloadError: the pieces hold values no encoder produces (an index out of range, a level
                past the last one).
        """
        raise NotImplementedError


def _index_dtype(size: int) -> torch.dtype:
    return torch.int32 if size < 2**31 else torch.int64


class TopK(Compressor):
    """Send the ``fraction`` of coordinates with the largest magnitude.

    Args:
        fraction: the share of coordinates sent, in ``(0, 1]`` (``k = ceil(fraction * d)``).
        error_feedback: keep the coordinates not sent on the frontend (per client) and add them
            to the next update, so that every coordinate is sent eventually; without it top-k of
            small fractions stalls training.
    """

    def __init__(self, fraction: float, error_feedback: bool = True) -> None:
        self.fraction = check_number("TopK", "fraction", fraction, 0.0, 1.0, low_open=True)
        if not isinstance(error_feedback, bool):
            raise ConfigurationError(f"TopK(error_feedback=...) must be True or False; got {error_feedback!r}")
        self.error_feedback = error_feedback

    def config(self) -> Dict[str, Any]:
        return {"fraction": self.fraction, "error_feedback": self.error_feedback}

    def k(self, size: int) -> int:
        return max(1, min(size, math.ceil(self.fraction * size)))

    def specs(self, size: int) -> List[TensorSpec]:
        k = self.k(size)
        return [TensorSpec(f"{WIRE}indices", _index_dtype(size), (k,)), TensorSpec(f"{WIRE}values", torch.float32, (k,))]

    def encode(self, vector: torch.Tensor, generator: torch.Generator) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        size = vector.numel()
        indices = torch.topk(vector.abs(), self.k(size), sorted=False).indices.sort().values
        values = vector[indices]
        decoded = torch.zeros_like(vector)
        decoded[indices] = values
        return {f"{WIRE}indices": indices.to(_index_dtype(size)), f"{WIRE}values": values}, decoded

    def decode(self, pieces: Dict[str, torch.Tensor], size: int) -> torch.Tensor:
        indices = pieces[f"{WIRE}indices"].to(torch.int64)
        if indices.numel():
            if int(indices[0]) < 0 or int(indices[-1]) >= size or not bool((indices[1:] > indices[:-1]).all()):
                raise PayloadError(f"TopK indices must be strictly increasing and in [0, {size}); these are not")
        out = torch.zeros(size, dtype=torch.float32)
        out[indices] = pieces[f"{WIRE}values"]
        return out


_PACK = {8: 1, 4: 2, 2: 4}  # codes per byte


class QSGD(Compressor):
    """Stochastic quantization to ``s = 2**(bits - 1) - 1`` levels each side of zero.

    Each bucket of ``bucket`` coordinates is scaled by its largest magnitude; coordinate ``x``
    becomes ``sign(x) * l * scale / s`` with ``l`` rounded stochastically between the two nearest
    levels, so the decoded vector is unbiased. On the wire: one float32 scale per bucket and
    ``bits`` bits per coordinate.

    Args:
        bits: bits per coordinate, 2, 4 or 8 (1, 7 or 127 levels each side).
        bucket: coordinates per scale, >= 1; 128 to 512 keep the error small.
    """

    def __init__(self, bits: int = 8, bucket: int = 512) -> None:
        if bits not in _PACK or isinstance(bits, bool):
            raise ConfigurationError(f"QSGD(bits=...) must be 2, 4 or 8 (they pack whole bytes); got {bits!r}")
        self.bits = int(bits)
        self.bucket = check_int("QSGD", "bucket", bucket, 1)
        self.levels = 2 ** (self.bits - 1) - 1

    def config(self) -> Dict[str, Any]:
        return {"bits": self.bits, "bucket": self.bucket}

    def _counts(self, size: int) -> Tuple[int, int]:
        buckets = max(1, math.ceil(size / self.bucket))
        return buckets, math.ceil(size / _PACK[self.bits])

    def specs(self, size: int) -> List[TensorSpec]:
        buckets, nbytes = self._counts(size)
        return [TensorSpec(f"{WIRE}scales", torch.float32, (buckets,)), TensorSpec(f"{WIRE}levels", torch.uint8, (nbytes,))]

    def encode(self, vector: torch.Tensor, generator: torch.Generator) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        size = vector.numel()
        buckets, _ = self._counts(size)
        padded = torch.zeros(buckets * self.bucket, dtype=torch.float32)
        padded[:size] = vector
        rows = padded.view(buckets, self.bucket)
        scales = rows.abs().amax(dim=1)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        ratio = rows.abs() / safe[:, None] * self.levels
        low = ratio.floor()
        level = low + (torch.rand(ratio.shape, generator=generator) < (ratio - low)).to(torch.float32)
        signed = (level.clamp_(0, self.levels) * rows.sign()).reshape(-1)[:size]
        codes = (signed + self.levels).to(torch.uint8)
        decoded = (signed.view(-1) * (scales.repeat_interleave(self.bucket)[:size] / self.levels))
        return {f"{WIRE}scales": scales, f"{WIRE}levels": _pack(codes, self.bits)}, decoded

    def decode(self, pieces: Dict[str, torch.Tensor], size: int) -> torch.Tensor:
        scales = pieces[f"{WIRE}scales"]
        if bool((scales < 0).any()):
            raise PayloadError("QSGD scales must be >= 0; a negative one came")
        codes = _unpack(pieces[f"{WIRE}levels"], self.bits, size)
        if bool((codes > 2 * self.levels).any()):
            raise PayloadError(f"QSGD levels must be codes in [0, {2 * self.levels}]; a larger one came")
        signed = codes.to(torch.float32) - self.levels
        return signed * (scales.repeat_interleave(self.bucket)[:size] / self.levels)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    per = _PACK[bits]
    if per == 1:
        return codes
    padded = torch.zeros(math.ceil(codes.numel() / per) * per, dtype=torch.uint8)
    padded[:codes.numel()] = codes
    grouped = padded.view(-1, per)
    out = torch.zeros(grouped.shape[0], dtype=torch.uint8)
    for slot in range(per):
        out |= grouped[:, slot] << (slot * bits)
    return out


def _unpack(packed: torch.Tensor, bits: int, size: int) -> torch.Tensor:
    per = _PACK[bits]
    if per == 1:
        return packed[:size]
    mask = (1 << bits) - 1
    parts = [(packed >> (slot * bits)) & mask for slot in range(per)]
    return torch.stack(parts, dim=1).reshape(-1)[:size]


_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


class Cast(Compressor):
    """Send the update in ``torch.float16`` or ``torch.bfloat16``: half the bytes of float32.

    Updates are small numbers: bfloat16 keeps float32's range (relative error ``2**-8``);
    float16 is more precise (``2**-11``) but flushes magnitudes below about ``6e-8`` to zero and
    clamps those above 65504.
    """

    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        if dtype not in _ROUNDOFF:
            raise ConfigurationError(f"Cast(dtype=...) must be torch.float16 or torch.bfloat16; got {dtype!r}")
        self.dtype = dtype
        self.unit_roundoff = _ROUNDOFF[dtype]

    def config(self) -> Dict[str, Any]:
        return {"dtype": str(self.dtype).replace("torch.", "")}

    def specs(self, size: int) -> List[TensorSpec]:
        return [TensorSpec(f"{WIRE}delta", self.dtype, (size,))]

    def encode(self, vector: torch.Tensor, generator: torch.Generator) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        top = torch.finfo(self.dtype).max
        cast = vector.clamp(-top, top).to(self.dtype)
        return {f"{WIRE}delta": cast}, cast.to(torch.float32)

    def decode(self, pieces: Dict[str, torch.Tensor], size: int) -> torch.Tensor:
        return pieces[f"{WIRE}delta"].to(torch.float32)
