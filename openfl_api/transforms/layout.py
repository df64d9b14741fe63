"""The flat update vector: every floating entry of an upload, as one float32 vector.

Transforms work on updates, ``delta = local - reference``, where the reference is the global
model the upload was trained from (the frontend keeps the one it downloaded; the backend uses its
current one). The floating entries of the upload schema (model parameters and floating buffers,
``optim/`` and ``extra/`` entries) are laid end to end in schema order; integer and bool entries
(``num_batches_tracked``) are not part of the vector.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional

import torch

from openfl_api.errors import ConfigurationError
from openfl_api.payload import Schema, TensorSpec, on_cuda

__all__ = ["Layout", "WIRE", "check_reserved"]

#: Prefix of the payload entries that transforms add (``wire/values``, ``wire/masked``, ...).
WIRE = "wire/"


def check_reserved(schema: Schema) -> None:
    """Raise ConfigurationError if an entry of ``schema`` is named like a transform's payload entry."""
    for spec in schema.specs:
        if spec.name.startswith(WIRE):
            raise ConfigurationError(f"state_dict key {spec.name!r} clashes with the prefix {WIRE} of upload transforms")


class Layout:
    """Where each floating entry of ``schema`` lives in the flat vector.

    Args:
        schema: the upload schema (``SharedState.upload_schema``).
    """

    def __init__(self, schema: Schema) -> None:
        self.schema = schema
        self.floating: List[TensorSpec] = [s for s in schema.specs if s.dtype.is_floating_point]
        self.others: List[TensorSpec] = [s for s in schema.specs if not s.dtype.is_floating_point]
        self.sizes = [math.prod(s.shape) for s in self.floating]
        self.offsets: List[int] = []
        size = 0
        for n in self.sizes:
            self.offsets.append(size)
            size += n
        #: Coordinates of the flat vector.
        self.size = size

    def flatten(self, tensors: Mapping[str, torch.Tensor], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The floating entries of ``tensors`` as one float32 vector on the CPU (zeros for a missing
        entry); allocated here, it is page-locked when an entry is on CUDA, so the entries reach the
        host by DMA."""
        flat = torch.empty(self.size, dtype=torch.float32, pin_memory=on_cuda(tensors.values())) if out is None else out
        with torch.no_grad():
            for spec, offset, n in zip(self.floating, self.offsets, self.sizes):
                source = tensors.get(spec.name)
                if source is None:
                    flat[offset:offset + n].zero_()
                else:
                    flat[offset:offset + n].copy_(source.detach().reshape(-1))
        return flat

    def unflatten(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Split a flat vector into one tensor per floating entry, each in its entry's dtype
        (views of ``flat`` where that dtype is float32)."""
        out: Dict[str, torch.Tensor] = {}
        for spec, offset, n in zip(self.floating, self.offsets, self.sizes):
            piece = flat[offset:offset + n].view(spec.shape)
            out[spec.name] = piece if spec.dtype == torch.float32 else piece.to(spec.dtype)
        return out
