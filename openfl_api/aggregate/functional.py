"""Pure tensor functions behind the aggregators: no state, no validation, no communication.

The stateful classes in :mod:`openfl_api.aggregate` decide *which* tensors meet; these functions
say *how* they combine, so each formula can be read and tested on its own.
"""

from __future__ import annotations

import torch

__all__ = [
    "accumulation_dtype",
    "finish_mean",
    "normalized_sensitivity",
    "elastic_update",
    "momentum_update_",
    "mix",
]

_CHUNK = 1 << 16  # elements per step of a division into another dtype (512 KiB of float64)
_ONE_PASS = 1 << 19  # up to this many elements torch's own division into another dtype is as fast


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Returns the dtype a running weighted sum of ``dtype`` tensors is kept in.

    float32, float64 and complex stay as they are; float16 and bfloat16 widen to float32 (their
    sums lose precision fast); integers and bool widen to float64, which holds every int32 and
    every int64 below 2**53 exactly.
    """
    if dtype in (torch.float32, torch.float64, torch.complex64, torch.complex128):
        return dtype
    if dtype.is_complex:
        return torch.complex64
    if dtype.is_floating_point:
        return torch.float32
    return torch.float64


def finish_mean(acc: torch.Tensor, total_weight: float, dtype: torch.dtype) -> torch.Tensor:
    """Turns a weighted sum into a fresh weighted-mean tensor of ``dtype``.

    Integer dtypes get the mean rounded to the nearest integer (halves to even, as
    :func:`torch.round`); bool gets ``mean >= 0.5``, so a tie keeps ``True``; floating and complex
    dtypes get a plain cast.

    Args:
        acc: sum of ``weight * value`` over the uploads; not modified.
        total_weight: sum of the weights; must be positive.
        dtype: dtype of the result.
    """
    if dtype.is_floating_point or dtype.is_complex:
        # Divided in acc's precision and rounded once to dtype as each element is stored: the bits
        # of (acc / total_weight).to(dtype).
        out = torch.empty(acc.shape, dtype=dtype, device=acc.device)
        if acc.dtype == dtype or acc.device.type != "cpu" or acc.numel() <= _ONE_PASS:
            return torch.div(acc, total_weight, out=out)
        # On the CPU torch's division of a large tensor into another dtype runs several times
        # slower than a division in acc's dtype and a rounding copy: those two, a cache-sized
        # chunk at a time.
        flat, into = acc.reshape(-1), out.view(-1)
        scratch = torch.empty(min(_CHUNK, flat.numel()), dtype=acc.dtype)
        for start in range(0, flat.numel(), _CHUNK):
            end = min(start + _CHUNK, flat.numel())
            part = scratch[:end - start]
            torch.div(flat[start:end], total_weight, out=part)
            into[start:end].copy_(part)
        return out
    mean = acc / total_weight
    if dtype == torch.bool:
        return mean >= 0.5
    return mean.round_().to(dtype)


def normalized_sensitivity(sensitivity: torch.Tensor) -> torch.Tensor:
    """Returns ``zeta = sensitivity / max(sensitivity)``, the max taken over the whole tensor.

    Where that max is 0 (nothing was tracked), ``zeta`` is 0 everywhere.

    Args:
        sensitivity: non-negative parameter sensitivities of one tensor.
    """
    if sensitivity.numel() == 0:
        return sensitivity.clone()
    peak = sensitivity.amax()
    if peak <= 0:
        return torch.zeros_like(sensitivity)
    return sensitivity / peak


def elastic_update(
    current: torch.Tensor, average: torch.Tensor, sensitivity: torch.Tensor, tau: float
) -> torch.Tensor:
    """Returns ``current - (1 + tau - zeta) * (current - average)``, the Elastic Aggregation step.

    ``zeta`` is :func:`normalized_sensitivity` of ``sensitivity``. This is the server step of
    Elastic Aggregation (Chen et al., CVPR 2023): parameters the clients' outputs are sensitive
    to (``zeta`` near 1) move by only ``tau`` of the averaged update, insensitive ones (``zeta``
    near 0) by up to ``1 + tau`` of it.

    Args:
        current: the global parameter before this round.
        average: weighted average of the clients' parameters.
        sensitivity: weighted average of the clients' sensitivities, same shape.
        tau: the expansion, in ``[0, 1]``.
    """
    zeta = normalized_sensitivity(sensitivity)
    return current - (1 + tau - zeta) * (current - average)


def momentum_update_(running: torch.Tensor, x: torch.Tensor, momentum: float) -> torch.Tensor:
    """Sets ``running = momentum * running + (1 - momentum) * |x|`` in place and returns it."""
    return running.mul_(momentum).add_(x.abs(), alpha=1 - momentum)


def mix(current: torch.Tensor, aggregated: torch.Tensor, alpha: float) -> torch.Tensor:
    """Return ``(1 - alpha) * current + alpha * aggregated``: FedAsync's mixing of a new model.

    Floating tensors are mixed in their own dtype; integer tensors (``num_batches_tracked``)
    cannot be mixed and take ``aggregated``. ``alpha`` is in ``[0, 1]``.
    """
    if not aggregated.is_floating_point():
        return aggregated.clone()
    return torch.lerp(current.to(aggregated.dtype), aggregated, alpha)
