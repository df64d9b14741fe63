"""The upload chain: transforms in a checked order, and the identity both sides compare.

A :class:`Chain` is declared on the API with ``api.set_upload_transforms(...)`` on every rank.
The frontend runs it in ``upload()`` (:class:`~openfl_api.transforms.frontend_side.FrontendSide`):
the update since the last download is clipped, compressed or masked, and what goes on the wire is
described by the chain's wire schema. The backend undoes it before aggregation
(:class:`~openfl_api.transforms.backend_side.BackendSide`): it decodes the update, adds it to its
reference model and hands the result to the aggregator, or, under secure aggregation, adds the
masked words to the round's sum; after aggregation it adds the noise.

Order rules (each refused with its reason): clip, then compress, then mask, then noise; at most
one transform of each stage; noise above 0 needs a clip; see :data:`RULES`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Optional, Sequence

from openfl_api.errors import ConfigurationError
from openfl_api.payload import Schema
from openfl_api.transforms.base import Stage, Transform
from openfl_api.transforms.compress import QSGD, Cast, Compressor, TopK
from openfl_api.transforms.dp import AdaptiveClip, Clip, GaussianNoise
from openfl_api.transforms.layout import Layout
from openfl_api.transforms.secagg import SecAgg

__all__ = ["Chain", "RULES"]

_WHY_ORDER = {
    (Stage.CLIP, Stage.COMPRESS): "clip before compress: the clip bound holds for what the backend decodes only "
                                  "if the compressor works on the clipped update",
    (Stage.CLIP, Stage.MASK): "clip before mask: the backend cannot clip what it cannot see",
    (Stage.CLIP, Stage.NOISE): "clip before noise: the noise is scaled to the clip bound",
    (Stage.COMPRESS, Stage.MASK): "compress before mask: masked words are uniform in the ring and do not compress",
    (Stage.COMPRESS, Stage.NOISE): "the noise is added by the backend to the aggregate, after every upload was decoded",
    (Stage.MASK, Stage.NOISE): "the noise is added by the backend to the unmasked aggregate",
}

#: The rules a chain is checked against, as the documentation states them.
RULES = [
    "transforms go in the order clip (Clip, AdaptiveClip), compress (TopK, QSGD, Cast), mask (SecAgg), "
    "noise (GaussianNoise); at most one of each",
    "GaussianNoise with a noise multiplier above 0 needs a clip before it",
    "with noise above 0: no QSGD (stochastic rounding can raise a norm above the clip bound) and no TopK with "
    "error feedback (the residual it adds was never clipped)",
    "SecAgg takes dense updates on one shared scale: no compressor with it",
    "SecAgg with AdaptiveClip is refused: each client's clip bit would reach the backend in the clear",
]


class Chain:
    """An ordered, checked list of upload transforms.

    Args:
        transforms: instances of :class:`~openfl_api.transforms.Clip`, ``AdaptiveClip``, ``TopK``,
            ``QSGD``, ``Cast``, ``SecAgg``, ``GaussianNoise``, in that order.
        seed: seeds the frontend's stochastic rounding (QSGD, SecAgg) per version and client, for
            reproducible runs; None draws fresh randomness.

    Raises:
        ConfigurationError: a rule is broken; the message says which and why.
    """

    def __init__(self, transforms: Sequence[Transform], seed: Optional[int] = None) -> None:
        items = list(transforms)
        if not items:
            raise ConfigurationError("set_upload_transforms(...) needs at least one transform, e.g. Clip(1.0)")
        for item in items:
            if not isinstance(item, Transform):
                raise ConfigurationError(f"upload transforms must be openfl_api.transforms objects such as Clip(1.0); "
                                         f"got {type(item).__name__}")
        for earlier, later in zip(items, items[1:]):
            if later.stage < earlier.stage:
                why = _WHY_ORDER[(later.stage, earlier.stage)]
                raise ConfigurationError(f"{later.name} must come before {earlier.name} in the upload chain: {why}")
            if later.stage == earlier.stage:
                kind = {Stage.CLIP: "clipping transform (Clip or AdaptiveClip)", Stage.COMPRESS:
                        "compressor (TopK, QSGD or Cast): a second one would compress the first's error",
                        Stage.MASK: "SecAgg", Stage.NOISE: "GaussianNoise"}[later.stage]
                raise ConfigurationError(f"an upload chain holds at most one {kind}; got {earlier!r} and {later!r}")
        by_stage = {item.stage: item for item in items}
        self.transforms = items
        self.clip: Any = by_stage.get(Stage.CLIP)
        self.compressor: Optional[Compressor] = by_stage.get(Stage.COMPRESS)  # type: ignore[assignment]
        self.secagg: Optional[SecAgg] = by_stage.get(Stage.MASK)  # type: ignore[assignment]
        self.noise: Optional[GaussianNoise] = by_stage.get(Stage.NOISE)  # type: ignore[assignment]
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ConfigurationError(f"set_upload_transforms(seed=...) must be an int >= 0 or None; got {seed!r}")
        self.seed = seed
        self._check_pairs()

    def _check_pairs(self) -> None:
        noisy = self.noise is not None and self.noise.noise_multiplier > 0
        if noisy and self.clip is None:
            raise ConfigurationError(
                f"{self.noise!r} needs a Clip or AdaptiveClip before it: the noise is scaled to the clip bound C, the "
                "most one client can move the sum; without a clip that is unbounded")
        if noisy and isinstance(self.compressor, QSGD):
            raise ConfigurationError(
                "QSGD cannot be combined with GaussianNoise: its stochastic rounding can raise an update's norm above "
                "the clip bound, which the noise is calibrated to; use Cast or TopK(error_feedback=False)")
        if noisy and isinstance(self.compressor, TopK) and self.compressor.error_feedback:
            raise ConfigurationError(
                "TopK(error_feedback=True) cannot be combined with GaussianNoise: the residual it adds to each update "
                "was never clipped, so the upload's norm is no longer bounded; use TopK(error_feedback=False)")
        if self.secagg is not None and self.compressor is not None:
            reason = {TopK: "top-k keeps different coordinates on each frontend, and masks only cancel on dense "
                            "vectors", QSGD: "QSGD scales each frontend's buckets differently, so the sum of its levels "
                            "means nothing; SecAgg quantizes on one shared scale itself",
                      Cast: "SecAgg quantizes to its ring already (its bits set the bytes)"}[type(self.compressor)]
            raise ConfigurationError(f"{self.compressor.name} cannot be combined with SecAgg: {reason}")
        if self.secagg is not None and isinstance(self.clip, AdaptiveClip):
            raise ConfigurationError("AdaptiveClip cannot be combined with SecAgg: each frontend's clip bit would reach "
                                     "the backend in the clear, which secure aggregation is meant to prevent; use Clip")
        if self.secagg is not None and self.secagg.clip_range is None and not isinstance(self.clip, Clip):
            raise ConfigurationError("SecAgg needs clip_range=... (the largest |coordinate| of an update) or a Clip "
                                     "before it (its bound is then the range)")

    # ------------------------------------------------------------------ identity
    def describe(self) -> List[Dict[str, Any]]:
        """One ``{"name": ..., parameters...}`` per transform, in order."""
        return [t.describe() for t in self.transforms]

    @property
    def digest(self) -> str:
        """16 hex digits of SHA-256 of the description: what each upload's header carries."""
        text = json.dumps(self.describe(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def differences(self, theirs: Any, their_name: str = "the frontend's", our_name: str = "the backend's") -> str:
        """Name how the chain ``theirs`` (a description) differs from this one; ``""`` if it does not."""
        ours = self.describe()
        if theirs is None:
            return f"{our_name} upload chain is {_names(ours)} and {their_name} declares none"
        if not isinstance(theirs, list) or not all(isinstance(t, dict) for t in theirs):
            return f"{their_name} upload chain is malformed"
        if theirs == ours:
            return ""
        if len(theirs) != len(ours):
            return f"{our_name} upload chain is {_names(ours)} and {their_name} is {_names(theirs)}"
        for index, (a, b) in enumerate(zip(ours, theirs)):
            if a != b:
                if a.get("name") != b.get("name"):
                    return f"transform {index + 1} is {a.get('name')} in {our_name} chain and {b.get('name')} in {their_name}"
                keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
                return "; ".join(f"{a['name']}({k}=...) is {a.get(k)!r} in {our_name} chain and {b.get(k)!r} in "
                                 f"{their_name}" for k in keys[:3])
        return "the chains differ"

    @property
    def needs_reference(self) -> bool:
        """Whether the frontend works on the update since its download (all but noise alone)."""
        return self.clip is not None or self.compressor is not None or self.secagg is not None

    def wire_schema(self, schema: Schema) -> Schema:
        """What an upload's payload holds under this chain, for an upload schema ``schema``."""
        layout = Layout(schema)
        if self.secagg is not None:
            return Schema(self.secagg.specs(layout.size))
        if self.compressor is not None:
            return Schema([*layout.others, *self.compressor.specs(layout.size)])
        return schema

    def __repr__(self) -> str:
        return f"Chain({', '.join(repr(t) for t in self.transforms)})"


def _names(description: List[Dict[str, Any]]) -> str:
    return "[" + ", ".join(str(t.get("name")) for t in description) + "]"

