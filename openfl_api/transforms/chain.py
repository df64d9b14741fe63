"""The upload chain: transforms in a checked order, and the two sides that run it.

A :class:`Chain` is declared on the API with ``api.set_upload_transforms(...)`` on every rank.
The frontend runs it in ``upload()`` (:class:`FrontendSide`): the update since the last download
is clipped, compressed or masked, and what goes on the wire is described by the chain's wire
schema. The backend undoes it before aggregation (:class:`BackendSide`): it decodes the update,
adds it to its reference model and hands the result to the aggregator, or, under secure
aggregation, adds the masked words to the round's sum; after aggregation it adds the noise.

Order rules (each refused with its reason): clip, then compress, then mask, then noise; at most
one transform of each stage; noise above 0 needs a clip; see :data:`RULES`.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from openfl_api.errors import ConfigurationError, PayloadError
from openfl_api.payload import Schema
from openfl_api.step import BACKEND, Step
from openfl_api.transforms.base import Stage, Transform
from openfl_api.transforms.compress import QSGD, Cast, Compressor, TopK
from openfl_api.transforms.dp import AdaptiveClip, Clip, GaussianNoise, add_noise_, update_noise_multiplier
from openfl_api.transforms.layout import WIRE, Layout
from openfl_api.transforms.secagg import (
    Board, Coordinator, FederationEnded, SecAgg, SecAggClient, SecAggFailure, quantize,
)

__all__ = ["Chain", "FrontendSide", "BackendSide", "RULES"]

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


def _weight_of(aggregator: Any, num_samples: int) -> int:
    from openfl_api.aggregate import NaiveAggregator

    return 1 if isinstance(aggregator, NaiveAggregator) else int(num_samples)


def _check_reserved(schema: Schema) -> None:
    for spec in schema.specs:
        if spec.name.startswith(WIRE):
            raise ConfigurationError(f"state_dict key {spec.name!r} clashes with the prefix {WIRE} of upload transforms")


class FrontendSide:
    """The chain on a frontend: from the local state to what goes on the wire.

    Args:
        chain: the chain.
        state: the frontend's :class:`~openfl_api.state.SharedState`.
        log: a bound logger.
        hosted: the virtual client ids of this frontend, or None.
        timeouts: the API's timeouts (secure aggregation waits on the backend's stages).
        token: the admission token (signs secure aggregation's store values).
    """

    def __init__(self, chain: Chain, state: Any, log: Any, hosted: Optional[List[str]], timeouts: Any,
                 token: bytes) -> None:
        _check_reserved(state.upload_schema)
        self.chain, self.state, self.log = chain, state, log
        self.layout = Layout(state.upload_schema)
        self.wire_schema = chain.wire_schema(state.upload_schema)
        self.reference: Optional[torch.Tensor] = None
        self.fields: Dict[str, Any] = {}
        self.residuals: Dict[str, torch.Tensor] = {}
        self.timeouts, self.token = timeouts, token
        self.uploads = 0
        self.bytes = 0
        self._secagg: Optional[SecAggClient] = None
        self._context: Optional[Dict[str, Any]] = None
        if chain.secagg is not None and hosted is not None and len(hosted) > 1:
            raise ConfigurationError(
                "SecAgg cannot run on a frontend that hosts several virtual clients: it uploads them one after another, "
                "while a round needs every member's keys before any masked update; host one client per frontend")

    def registration(self) -> List[Dict[str, Any]]:
        return self.chain.describe()

    def downloaded(self, tensors: Mapping[str, torch.Tensor], fields: Any) -> None:
        """After a download: keep the global model as the reference of the next update."""
        if not isinstance(fields, dict) or fields.get("digest") != self.chain.digest:
            raise PayloadError("the backend's model carries no matching 'transforms' field: its upload chain differs "
                               "from this frontend's")
        self.fields = fields
        if self.chain.needs_reference:
            self.reference = self.layout.flatten(tensors)

    def _generator(self, version: int, client: str) -> torch.Generator:
        if self.chain.seed is None:
            return torch.Generator().manual_seed(secrets.randbits(63))
        from openfl_api.virtual_clients import client_seed

        return torch.Generator().manual_seed(client_seed(self.chain.seed, version, client or "0"))

    def outgoing(self, tensors: Dict[str, torch.Tensor], version: int, client: str, num_samples: int,
                 store: Any, ended: Any = lambda: None) -> Optional[Tuple[Dict[str, torch.Tensor], Schema, Dict[str, Any]]]:
        """What to send for the local ``tensors``: ``(wire tensors, wire schema, meta fields)``, or
        None when this update takes no part (``self.skipped`` says why; ``self.ended`` is True when
        the federation ended meanwhile). ``ended()``: whether the backend recorded the end."""
        chain = self.chain
        meta: Dict[str, Any] = {"transforms": chain.digest}
        self.skipped = ""
        self.ended = False
        self._ended = ended
        if not chain.needs_reference:
            return tensors, self.wire_schema, meta
        if self.reference is None:
            raise ConfigurationError("upload transforms work on the update since the last download(): call "
                                     "api.download() before api.upload()")
        update = self.layout.flatten(tensors)
        update -= self.reference
        key = client or ""
        compressor = chain.compressor
        if compressor is not None and compressor.error_feedback and key in self.residuals:
            update += self.residuals[key]
        clipped = False
        if chain.clip is not None:
            bound = float(self.fields.get("clip", chain.clip.initial_bound()))
            if compressor is not None:
                bound /= 1 + compressor.unit_roundoff  # the compressor's rounding stays within the bound
            norm = float(torch.linalg.vector_norm(update))
            if norm > bound:
                update *= bound / norm
                clipped = True
            if chain.clip.adaptive:
                meta["clip_bit"] = 0 if clipped else 1
        generator = self._generator(version, key)
        if chain.secagg is not None:
            return self._masked(update, version, key, num_samples, store, generator, meta)
        if compressor is not None:
            pieces, decoded = compressor.encode(update, generator)
            if compressor.error_feedback:
                self.residuals[key] = update - decoded
            wire = {spec.name: tensors[spec.name] for spec in self.layout.others}
            wire.update(pieces)
            return wire, self.wire_schema, meta
        if not clipped:
            return tensors, self.wire_schema, meta  # within the bound: the upload goes out as it is
        update += self.reference
        wire = dict(tensors)
        wire.update(self.layout.unflatten(update))
        return wire, self.wire_schema, meta

    def _masked(self, update: torch.Tensor, version: int, client: str, num_samples: int, store: Any,
                generator: torch.Generator, meta: Dict[str, Any]) -> Optional[Tuple[Dict[str, torch.Tensor], Schema, Dict[str, Any]]]:
        chain = self.chain
        secagg = chain.secagg
        fields = self.fields.get("secagg")
        if not isinstance(fields, dict) or not isinstance(fields.get("run"), str):
            raise PayloadError("the backend's model carries no secure-aggregation run id")
        if self._secagg is None or self._secagg.run != fields["run"] or self._secagg.board.stores[0] is not store:
            board = Board([store], fields["run"], self.token)
            self._secagg = SecAggClient(secagg, board, fields["run"], self.log, self.timeouts.idle, self.timeouts.status)
        clip_range = float(fields["clip_range"])
        levels, clamped = quantize(update, clip_range, secagg.bits, generator)
        if clamped:
            self.log.warning(f"secure aggregation: {clamped} coordinates of the update were clamped to +-{clip_range:g} "
                             "(SecAgg(clip_range=...))")
        weight = _weight_of(self.state.aggregator, num_samples)
        asynchronous = bool(fields.get("asynchronous"))
        before = self._secagg.board.sent + self._secagg.board.received
        self._secagg.ended = self._ended
        try:
            result = self._secagg.masked(levels, weight, client or "", None if asynchronous else version, clip_range)
        except FederationEnded:
            self.skipped, self.ended = "the federation ended during secure aggregation's round", True
            return None
        self.control = self._secagg.board.sent + self._secagg.board.received - before
        if result is None:
            self.skipped = self._secagg.skipped
            return None
        words, self._context = result
        masked = torch.from_numpy(words.view(np.int32))
        return {f"{WIRE}masked": masked}, self.wire_schema, meta

    def sent(self, nbytes: int) -> None:
        self.uploads += 1
        self.bytes += nbytes

    def answered(self, accepted: bool) -> None:
        """After the backend's answer: secure aggregation sends its unmask shares."""
        context, self._context = self._context, None
        if context is not None and accepted:
            try:
                self._secagg.unmask(context)
            except FederationEnded:
                pass  # the backend ended the federation before it needed these shares


class BackendSide:
    """The chain on the backend: decoding uploads, secure aggregation's rounds, the noise.

    Args:
        chain: the chain.
        api: the backend API (its version, clients, log, aggregate() and stop()).
        server: the prepared :class:`~openfl_api.backend.Server` (its model, ledger and lobbies).
        token: the federation's token, or None.
        needs: the steps' ``uploads_needed``.
    """

    def __init__(self, chain: Chain, api: Any, server: Any, token: Optional[str],
                 needs: Callable[[], Optional[Tuple[int, str]]]) -> None:
        from openfl_api.aggregate import AverageAggregator, NaiveAggregator

        state = server.model.state
        _check_reserved(state.upload_schema)
        self.chain, self.api, self.state = chain, api, state
        self.server, self._token, self._needs = server, token, needs
        self.log = api.log
        self.layout = Layout(state.upload_schema)
        self.wire_schema = chain.wire_schema(state.upload_schema)
        self.plain_bytes = state.upload_schema.nbytes
        self.run = secrets.token_hex(8)
        self.bound = chain.clip.initial_bound() if chain.clip is not None else math.inf
        self._bits = [0, 0]  # adaptive clipping: uploads within the bound, uploads
        self._reference: Optional[Tuple[int, torch.Tensor]] = None
        self.bytes: Dict[int, List[int]] = {}  # version -> [uploads, header bytes, payload bytes]
        self.report: Dict[int, Dict[str, Any]] = {}  # version -> what was logged after it
        aggregator = state.aggregator
        noisy = chain.noise is not None and chain.noise.noise_multiplier > 0
        if noisy and type(aggregator) is not NaiveAggregator:
            raise ConfigurationError(
                f"GaussianNoise needs aggregate.NaiveAggregator, got {type(aggregator).__name__}: client-level DP bounds "
                "each client's share of the aggregate by the clip bound only when every client counts the same "
                "(DP-FedAvg's uniform mean)")
        if chain.secagg is not None and type(aggregator) not in (AverageAggregator, NaiveAggregator):
            raise ConfigurationError(
                f"SecAgg needs AverageAggregator or NaiveAggregator, got {type(aggregator).__name__}: the backend "
                "learns only the weighted sum of the updates, which is all a mean needs")
        self.coordinator: Optional[Coordinator] = None
        self.asynchronous = api.asynchronous is not None
        if chain.secagg is not None and self.asynchronous and chain.secagg.cohort is None:
            raise ConfigurationError("SecAgg in asynchronous mode needs cohort=K: each round is a FedBuff buffer of K "
                                     "frontends")
        self.clip_range = (chain.secagg.clip_range if chain.secagg is not None and chain.secagg.clip_range is not None
                           else self.bound)

    # ------------------------------------------------------------------ joins and downloads
    def mismatch(self, declared: Any) -> Optional[str]:
        differences = self.chain.differences(declared)
        if not differences:
            return None
        return (f"its upload transforms differ from the backend's: {differences}. Declare the same "
                "api.set_upload_transforms(...) on every rank")

    def fields(self) -> Dict[str, Any]:
        """What each download's header carries under ``"transforms"``."""
        out: Dict[str, Any] = {"digest": self.chain.digest}
        if self.chain.clip is not None:
            out["clip"] = self.bound
        if self.chain.secagg is not None:
            out["secagg"] = {"run": self.run, "clip_range": self.clip_range, "asynchronous": self.asynchronous}
        return out

    def _stores(self) -> List[Any]:
        return [lobby.store for lobby in self.server.members.addresses.lobbies.values()]

    # ------------------------------------------------------------------ uploads
    def admit(self, meta: Mapping[str, Any], client: str) -> None:
        """Check an upload before it is judged; raise PayloadError to discard it as invalid."""
        if meta.get("transforms") != self.chain.digest:
            raise PayloadError(f"its header names upload chain {str(meta.get('transforms'))[:20]!r}, the backend's is "
                               f"{self.chain.digest!r}")
        if isinstance(self.chain.clip, AdaptiveClip) and meta.get("clip_bit") not in (0, 1):
            raise PayloadError("an upload under AdaptiveClip must carry clip_bit 0 or 1 in its meta")
        if self.coordinator is not None:
            self.coordinator.admit(client)

    def reference(self) -> torch.Tensor:
        """The current global model (and exchanged optimizer state) as a flat vector, once per version."""
        version = self.api.version
        if self._reference is None or self._reference[0] != version:
            model = self.server.model
            tensors = dict(model.current())
            tensors.update(model.optim_state)
            self._reference = (version, self.layout.flatten(tensors))
        return self._reference[1]

    def incoming(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], client: str, num_samples: int,
                 nbytes: Tuple[int, int]) -> Optional[Dict[str, torch.Tensor]]:
        """An accepted upload (``nbytes``: its header and payload bytes): the tensors for the
        aggregator, or None when secure aggregation took it."""
        counts = self.bytes.setdefault(self.api.version, [0, 0, 0])
        counts[0] += 1
        counts[1] += nbytes[0]
        counts[2] += nbytes[1]
        if isinstance(self.chain.clip, AdaptiveClip):
            self._bits[0] += int(meta["clip_bit"])
            self._bits[1] += 1
        if self.coordinator is not None:
            self.coordinator.deposit(client, tensors[f"{WIRE}masked"], _weight_of(self.state.aggregator, num_samples))
            return None
        compressor = self.chain.compressor
        if compressor is None:
            return dict(tensors)
        vector = compressor.decode({s.name: tensors[s.name] for s in compressor.specs(self.layout.size)}, self.layout.size)
        vector += self.reference()
        out = self.layout.unflatten(vector)
        for spec in self.layout.others:
            out[spec.name] = tensors[spec.name]
        return out

    # ------------------------------------------------------------------ rounds and aggregation
    def tick(self) -> None:
        """A turn of the serve loop: move secure aggregation's round on; aggregate once it is unmasked."""
        if self.chain.secagg is None:
            return
        api = self.api
        if self.coordinator is None:
            self.coordinator = Coordinator(self.chain.secagg, Board(self._stores(), self.run, self._token), self.run,
                                           self.layout.size, self.clip_range, self.log, self.asynchronous)
            self.coordinator.open(api.version)
        coordinator = self.coordinator
        try:
            needs = self._needs()
            ready = coordinator.stage not in ("ready", "failed") and coordinator.tick(
                api.clients, api.expected, needs[0] if needs else 0)
        except SecAggFailure as exc:
            self.log.error(f"{exc}; the model is unchanged and the federation stops")
            self._count_refusals()
            api.stop(str(exc))
            return
        self._count_refusals()
        if ready:
            api.aggregate()

    def _count_refusals(self) -> None:
        coordinator = self.coordinator
        ledger = self.server.ledger
        while coordinator is not None and coordinator.refused:
            client, reason = coordinator.refused.pop(0)
            ledger.discard(client, reason)

    def ready(self) -> bool:
        """Whether the accepted uploads can be aggregated now (secure aggregation: once unmasked)."""
        return self.coordinator is None or self.coordinator.stage == "ready"

    def before_aggregate(self, aggregator: Any) -> None:
        """Secure aggregation: hand the unmasked mean to the aggregator as one upload."""
        if self.coordinator is None:
            return
        total, weight = self.coordinator.result
        vector = (total / weight).to(torch.float32) + self.reference()
        tensors = self.layout.unflatten(vector)
        current = self.server.model.current()
        for spec in self.layout.others:
            tensors[spec.name] = current[spec.name] if spec.name in current else torch.zeros(spec.shape, dtype=spec.dtype)
        aggregator.add(tensors, 1, 1.0)

    def after_aggregate(self, new: Dict[str, torch.Tensor], count: int) -> Dict[str, torch.Tensor]:
        """Add the noise to the aggregate (and move an adaptive bound); returns ``new``."""
        version = self.api.version
        report: Dict[str, Any] = {"uploads": count}
        noise, clip = self.chain.noise, self.chain.clip
        bound = self.bound
        if noise is not None:
            m = noise.expected_clients or count
            z = noise.noise_multiplier
            if isinstance(clip, AdaptiveClip):
                count_noise = clip.count_noise if clip.count_noise is not None else (m / 20 if z > 0 else 0.0)
                z_update = update_noise_multiplier(z, count_noise) if z > 0 else 0.0
            else:
                z_update = z
            if noise.expected_clients is not None and count != m:
                reference = self.reference()
                scaled = (self.layout.flatten(new) - reference) * (count / m) + reference
                new.update({k: v.clone() for k, v in self.layout.unflatten(scaled).items()})
            generator = noise.generator(version)
            if z_update > 0:
                add_noise_([new[s.name] for s in self.layout.floating if s.name in new], z_update * bound / m, generator)
                noise.account()
            report.update(epsilon=noise.epsilon(), delta=noise.delta, noise_std=z_update * bound / m)
        if isinstance(clip, AdaptiveClip):
            within, uploads = self._bits
            m = (noise.expected_clients if noise is not None and noise.expected_clients else uploads) or 1
            z = noise.noise_multiplier if noise is not None else 0.0
            count_noise = clip.count_noise if clip.count_noise is not None else (m / 20 if z > 0 else 0.0)
            generator = noise.generator(version + 2**40) if noise is not None else torch.Generator().manual_seed(
                secrets.randbits(63))
            self.bound, share = clip.next_bound(bound, within, m, count_noise, generator)
            self._bits = [0, 0]
            report.update(clip=bound, next_clip=self.bound, within=share)
        self.report[version + 1] = report
        return new

    def after_version(self) -> None:
        """The new version exists: log its bytes and privacy; open secure aggregation's next round."""
        version = self.api.version
        report = self.report.get(version, {})
        uploads, header, payload = self.bytes.pop(version - 1, [0, 0, 0])
        if uploads:
            each = payload / uploads
            line = (f"version {version}: {uploads} uploads of {each:,.0f} payload bytes each, {self.plain_bytes / each:.2f}x "
                    f"fewer than the plain upload's {self.plain_bytes:,}, plus {header / uploads:,.0f} header bytes")
            if self.coordinator is not None:
                control = self.coordinator.control_bytes.get(self.coordinator.round_id, 0)
                line += f"; secure aggregation's store traffic {control:,} bytes"
            self.log.info(line)
            report.update(upload_bytes=each)
        if "epsilon" in report:
            noise = self.chain.noise
            self.log.info(f"version {version}: privacy spent epsilon {report['epsilon']:.4g} at delta {noise.delta:g} "
                          f"(Opacus {noise.accountant_kind.upper()} accountant; noise multiplier "
                          f"{noise.noise_multiplier:g}, sample rate {noise.sample_rate:g}, {noise.steps} noisy versions)")
        if "next_clip" in report:
            self.log.info(f"version {version}: clip bound {report['clip']:.4g} -> {report['next_clip']:.4g} "
                          f"(share within {report['within']:.2f})")
        if self.coordinator is not None:
            self.coordinator.open(version)

    def state_dict(self) -> Dict[str, Any]:
        return {"bound": float(self.bound) if math.isfinite(self.bound) else -1.0,
                "noise": self.chain.noise.state_dict() if self.chain.noise is not None else {}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state["bound"] >= 0:
            self.bound = float(state["bound"])
        if self.chain.noise is not None:
            self.chain.noise.load_state_dict(state["noise"])


class ChainStep(Step):
    """The upload chain's backend hooks: secure aggregation's rounds each turn, the logs of a new
    version; its ``state_dict`` (the accountant's history, an adaptive bound) goes into checkpoints."""

    roles = frozenset({BACKEND})

    def __init__(self) -> None:
        #: The chain's backend side, set by :func:`attach_backend` once the backend is prepared.
        self.side: Optional["BackendSide"] = None

    @property
    def name(self) -> str:
        return "UploadTransforms"

    def _side(self) -> Optional["BackendSide"]:
        return self.side

    def at_loop(self, api: Any) -> None:
        side = self._side()
        if side is not None:
            side.tick()

    def after_upload(self, api: Any, transfer: Any) -> None:
        side = self._side()
        if side is not None and transfer.accepted:
            side.tick()

    def after_aggregate(self, api: Any) -> None:
        side = self._side()
        if side is not None:
            side.after_version()

    def state_dict(self) -> Dict[str, Any]:
        side = self._side()
        return side.state_dict() if side is not None else {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        side = self._side()
        if side is not None and state:
            side.load_state_dict(state)


def attach_backend(chain: Chain, api: Any, server: Any, token: Optional[str], step: ChainStep,
                   needs: Callable[[], Optional[Tuple[int, str]]]) -> "BackendSide":
    """Give a prepared backend its side of the chain (and room for the chain's payloads).

    ``token`` is the federation's token (it keys secure aggregation's board), ``step`` the chain's
    registered :class:`ChainStep`, ``needs`` the steps' ``uploads_needed``."""
    from openfl_api.payload import MAX_HEADER_BYTES
    from openfl_api.transport.base import REQUESTS, Limits

    side = BackendSide(chain, api, server, token, needs)
    server.exchange.transforms = side
    step.side = side
    largest = max(server.request_limits.max_payload, side.wire_schema.nbytes)
    server.request_limits = Limits(REQUESTS, MAX_HEADER_BYTES, largest)
    return side
