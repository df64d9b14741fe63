"""The upload chain on a frontend: from the local state to what goes on the wire."""

from __future__ import annotations

import secrets
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from openfl_api.errors import ConfigurationError, PayloadError
from openfl_api.payload import Schema
from openfl_api.transforms.chain import Chain
from openfl_api.transforms.layout import WIRE, Layout, check_reserved
from openfl_api.transforms.secagg import Board, FederationEnded, SecAggClient, SecAggFailure, quantize, weight_of

__all__ = ["FrontendSide"]


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
        check_reserved(state.upload_schema)
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
        weight = weight_of(self.state.aggregator, num_samples)
        asynchronous = bool(fields.get("asynchronous"))
        before = self._secagg.board.sent + self._secagg.board.received
        self._secagg.ended = self._ended
        try:
            result = self._secagg.masked(levels, weight, client or "", None if asynchronous else version, clip_range)
        except FederationEnded:
            self.skipped, self.ended = "the federation ended during secure aggregation's round", True
            return None
        except SecAggFailure as exc:  # its round failed: this update takes no part, the next one joins the next round
            self.skipped = str(exc)
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

    def answered(self, accepted: bool) -> str:
        """After the backend's answer: secure aggregation sends its unmask shares. Returns why the
        accepted upload does not count after all (its round failed), or ""."""
        context, self._context = self._context, None
        if context is not None and accepted:
            try:
                self._secagg.unmask(context)
            except FederationEnded:
                pass  # the backend ended the federation before it needed these shares
            except SecAggFailure as exc:
                return str(exc)
        return ""

