"""SecAgg's settings, the transform a chain declares, and the errors of its rounds."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any, Dict, List, Optional, Sequence

import torch

from openfl_api.errors import ConfigurationError, OpenFLError
from openfl_api.payload import TensorSpec
from openfl_api.transforms import crypto
from openfl_api.transforms.base import Stage, Transform, check_int, check_number
from openfl_api.transforms.layout import WIRE

__all__ = ["SecAgg", "SecAggFailure", "FederationEnded", "MASKED"]

#: The payload entry of a masked upload (int32 words, read as uint32).
MASKED = f"{WIRE}masked"


class SecAggFailure(OpenFLError, RuntimeError):
    """A secure-aggregation round cannot give the sum (too few shares, a bad share, ...).

    Attributes:
        culprits: the members whose share, answer or commitment made the round fail (may be empty).
        fix: what to change so that rounds stop failing this way ("" when nothing is to change).
    """

    def __init__(self, message: str, culprits: Sequence[str] = (), fix: str = "") -> None:
        super().__init__(message)
        self.culprits = sorted(culprits)
        self.fix = fix


class FederationEnded(Exception):
    """The federation ended while a frontend waited on a round (not an error)."""


class SecAgg(Transform):
    """Secure aggregation of the uploads of each round (see the module docstring).

    Args:
        clip_range: each coordinate of an update is clamped to ``[-clip_range, clip_range]`` before
            it is quantized; None takes the bound of a :class:`~openfl_api.transforms.Clip` before
            it (a clipped update has no coordinate above its norm bound).
        bits: quantization levels ``2**bits``, in ``[1, 24]``; the step is
            ``2 * clip_range / (2**bits - 1)``. The weighted sum of a round must fit the 32-bit
            ring: ``sum of weights * (2**bits - 1) < 2**32`` (checked when a round's members are known).
        threshold: a dealer's secrets are rebuilt from more than ``threshold`` of its share holders
            (``t = floor(threshold * holders) + 1``), in ``[0.5, 1)``: a majority at least.
        neighbours: None: every member masks with every other (SecAgg). An even number ``k``: each
            member masks with ``k`` neighbours on a ring over the members in a random order that the
            backend draws (SecAgg+); shares are held by the neighbours and the member itself.
        deadline: how long a stage waits for the members that have not answered (the key stage
            counts from the first key of the round) before it goes on with those that did.
        min_clients: the fewest members a round goes on with, >= 2.
        cohort: asynchronous mode: members per round (the FedBuff buffer size), >= 2. Synchronous
            mode: None, every connected client (or every client a sampling step expects).
    """

    stage = Stage.MASK

    def __init__(self, clip_range: Optional[float] = None, bits: int = 16, threshold: float = 0.5,
                 neighbours: Optional[int] = None, deadline: timedelta = timedelta(seconds=60),
                 min_clients: int = 2, cohort: Optional[int] = None) -> None:
        crypto.require()
        self.clip_range = None if clip_range is None else check_number("SecAgg", "clip_range", clip_range, 0.0,
                                                                       low_open=True)
        self.bits = check_int("SecAgg", "bits", bits, 1, 24)
        self.threshold = check_number("SecAgg", "threshold", threshold, 0.5, 1.0, high_open=True)
        if neighbours is not None:
            neighbours = check_int("SecAgg", "neighbours", neighbours, 2)
            if neighbours % 2:
                raise ConfigurationError(f"SecAgg(neighbours=...) must be even (half on each side of a member in the "
                                         f"ring), got {neighbours}")
        self.neighbours = neighbours
        if not isinstance(deadline, timedelta) or deadline <= timedelta(0):
            raise ConfigurationError(f"SecAgg(deadline=...) must be a positive datetime.timedelta; got {deadline!r}")
        self.deadline = deadline
        self.min_clients = check_int("SecAgg", "min_clients", min_clients, 2)
        self.cohort = None if cohort is None else check_int("SecAgg", "cohort", cohort, 2)

    def config(self) -> Dict[str, Any]:
        return {"clip_range": self.clip_range, "bits": self.bits, "threshold": self.threshold,
                "neighbours": self.neighbours, "deadline": self.deadline.total_seconds(),
                "min_clients": self.min_clients, "cohort": self.cohort}

    def specs(self, size: int) -> List[TensorSpec]:
        return [TensorSpec(MASKED, torch.int32, (size,))]

    def step(self, clip_range: float) -> float:
        """The quantization step for ``clip_range``."""
        return 2 * clip_range / (2**self.bits - 1)

    def holders_threshold(self, holders: int) -> int:
        return min(holders, math.floor(self.threshold * holders) + 1)

