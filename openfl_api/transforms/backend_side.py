"""The upload chain on the backend: decoding uploads, secure aggregation's rounds, the noise.

:func:`attach_backend` gives a prepared backend its :class:`BackendSide`; the registered
:class:`ChainStep` drives it from the serve loop and carries its state in checkpoints.
"""

from __future__ import annotations

import math
import secrets
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from openfl_api.errors import ConfigurationError, PayloadError
from openfl_api.step import BACKEND, Step
from openfl_api.transforms.chain import Chain
from openfl_api.transforms.dp import AdaptiveClip, add_noise_, update_noise_multiplier
from openfl_api.transforms.layout import WIRE, Layout, check_reserved
from openfl_api.transforms.secagg import Board, Coordinator, SecAggFailure, weight_of

__all__ = ["BackendSide", "ChainStep", "attach_backend"]


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
        check_reserved(state.upload_schema)
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
            self.coordinator.deposit(client, tensors[f"{WIRE}masked"], weight_of(self.state.aggregator, num_samples))
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
            self._count_refusals()
            self._discard_round(exc)
            return
        self._count_refusals()
        if ready:
            api.aggregate()

    def _discard_round(self, failure: SecAggFailure) -> None:
        """A round failed: discard its masked uploads (the model is unchanged), count them, and
        open the next round; the federation goes on."""
        coordinator, server = self.coordinator, self.server
        uploads = sorted(coordinator.deposited)
        taken = server.exchange.withdraw(uploads)
        reason = f"secure aggregation round failed: {failure}"
        for client in uploads:
            worker = server.exchange.clients.get(client)
            label = worker.label if worker is not None else client
            server.ledger.add(label, "uploads", -1)
            server.ledger.discard(label, reason)
        coordinator.open(self.api.version)
        culprits = f" Culprits: {failure.culprits}." if failure.culprits else ""
        fix = f" Fix: {failure.fix}." if failure.fix else ""
        self.log.error(f"{failure}.{culprits} Its {taken} masked uploads {uploads} are discarded and counted, the model "
                       f"is unchanged; the federation goes on with round {coordinator.round_id}.{fix}")

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
            kept = current.get(spec.name)
            tensors[spec.name] = kept.cpu() if kept is not None else torch.zeros(spec.shape, dtype=spec.dtype)
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
