"""Aggregators that apply the uploads as *updates* of the model they were trained from.

:class:`UpdateAggregator` is the base of :class:`Mean`, the robust rules
(:mod:`openfl_api.aggregate.robust`) and the server sides of the client-side algorithms
(:mod:`openfl_api.strategies`). Compared with :class:`~openfl_api.aggregate.Aggregator` it adds:

- **a server step.** With ``server=`` (a :class:`~openfl_api.aggregate.server_opt.ServerOptimizer`
  such as ``FedAdam(lr=0.01)``) the parameters move by the server optimizer applied to the
  pseudo-gradient ``reference - aggregate``; without it a synchronous version takes the aggregate
  itself (FedAvg, bit for bit the same as :class:`~openfl_api.aggregate.AverageAggregator`).
- **updates in asynchronous mode.** An upload trained from an older version is an update of that
  version's model, ``y - x_from``, not of the newest one: the aggregator keeps the global
  parameters of the last ``max_staleness + 1`` versions (``Asynchronous(max_staleness=...)`` must
  then be set) and applies the staleness-weighted mean of the updates, with the server step (FedBuff
  with ``AggregateCount(K)``: ``x = x - lr * sum_i s_i * (x_from_i - y_i) / K``). ``Asynchronous``'s
  ``alpha`` is not used: the server learning rate takes its place.
- **norm clipping of updates.** ``max_norm=C`` scales each upload's parameter update
  ``y - x_from`` (its L2 norm over every parameter) down to at most ``C`` before it is aggregated.
- **named extra tensors both ways** (:meth:`extra_layout`): tensors the backend serves beside the
  model and tensors frontends upload with it, checked like the model and kept in checkpoints.

Only parameters are treated as updates; buffers, exchanged optimizer state and extras are
averaged as by the base class. The backend hands every accepted upload's context to :meth:`add`
(``context=``: the client, the version it was trained from, its staleness), which is how the
reference model of each upload is found. Checkpoints keep the server optimizer's state, the
kept global parameters and any server state of a subclass, so a resumed backend continues
exactly.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Dict, List, Optional, Tuple

import torch

from openfl_api.aggregate.base import Aggregator
from openfl_api.aggregate.functional import finish_mean
from openfl_api.aggregate.server_opt import ServerOptimizer
from openfl_api.errors import ConfigurationError

__all__ = ["UpdateAggregator", "Mean", "clip_update"]

Spec = Tuple[torch.dtype, Tuple[int, ...]]


def clip_update(update: Sequence[torch.Tensor], max_norm: float) -> Tuple[float, float]:
    """The L2 norm of an update given as tensors (float64, summed in their order) and the factor
    ``min(1, max_norm / norm)`` that clips it to ``max_norm``: ``(norm, factor)``."""
    norm = math.sqrt(math.fsum(float(torch.sum(t.double() * t.double())) for t in update))
    return norm, (1.0 if norm <= max_norm else max_norm / norm)


class UpdateAggregator(Aggregator):
    """Base of the aggregators that treat uploads as updates: server step, asynchronous updates,
    norm clipping and named extras (see the module docstring).

    Args:
        params: the model's parameters, e.g. ``net.parameters()``, in ``state_dict`` order.
        server: a server optimizer applied to the pseudo-gradient, or None (see the subclass).
        max_norm: clip each upload's parameter update to this L2 norm; None does not clip.
        state_keys: optimizer-state keys per parameter to aggregate along with the model.
        weighted: weight uploads by ``num_samples`` (FedAvg) instead of equally.

    Raises:
        ConfigurationError: an argument is out of range; see also :class:`Aggregator`.
    """

    #: Tells the backend that :meth:`aggregate` applies the server step itself: asynchronous
    #: mode does not mix the result into the global model again.
    steps_server = True

    def __init__(self, params: Iterable[torch.Tensor], *, server: Optional[ServerOptimizer] = None,
                 max_norm: Optional[float] = None, state_keys: Sequence[str] = (), weighted: bool = True) -> None:
        super().__init__(params, state_keys)
        label = type(self).__name__
        if server is not None and not isinstance(server, ServerOptimizer):
            raise ConfigurationError(
                f"{label}(server=...) must be a server optimizer such as aggregate.FedAdam(lr=0.01) or None; got "
                f"{type(server).__name__} (a torch.optim optimizer goes to set_aggregator_and_optimizer's "
                "server_optimizer= of an AverageAggregator instead)")
        if max_norm is not None and (isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real)
                                     or not math.isfinite(max_norm) or max_norm <= 0):
            raise ConfigurationError(f"{label}(max_norm=...) must be a finite number > 0 or None, got {max_norm!r}")
        if not isinstance(weighted, bool):
            raise ConfigurationError(f"{label}(weighted=...) must be a bool, got {weighted!r}")
        self.server = server
        self.max_norm = None if max_norm is None else float(max_norm)
        self.weighted = weighted
        self._plain: List[float] = []  # the weights without the staleness factor
        self._by_version: Dict[int, List[float]] = {}  # trained-from version -> effective weights
        self._global: Optional[int] = None  # the global version of the uploads added
        self._asynchronous = False
        self._max_staleness: Optional[int] = 0
        self._history: Dict[int, Dict[str, torch.Tensor]] = {}  # version -> global parameters then
        self._results: Optional[Dict[str, torch.Tensor]] = None  # while aggregate() finishes entries
        self._received: Dict[str, torch.Tensor] = {}  # frontend: the named extras of the last download
        self._staged: Dict[str, torch.Tensor] = {}  # frontend: named extras for the next upload
        self.clipped = 0  # uploads clipped so far (max_norm)

    # ----------------------------------------------------------------- weights
    def effective_weight(self, num_samples: int, weight: float) -> float:
        """``num_samples * weight`` when ``weighted``, else ``weight``."""
        return num_samples * weight if self.weighted else weight

    # ----------------------------------------------------------------- named extras
    def extra_layout(self) -> Tuple[Dict[str, Spec], Dict[str, Spec]]:
        """The named extras, ``(download, upload)``: dicts ``"extra/<name>" -> (dtype, shape)``.

        Subclasses declare theirs; the base has none. Called once :meth:`bind` named the parameters.
        """
        return {}, {}

    def download_extras(self) -> Dict[str, torch.Tensor]:
        """Backend: the named extras served with the model, one tensor per download name."""
        return {}

    def receive_extras(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Frontend: keep the named extras of a download (copies: the receive buffer is reused)."""
        self._received = {name: tensor.detach().clone() for name, tensor in tensors.items()}

    def received(self, name: str) -> torch.Tensor:
        """Frontend: the named extra ``name`` of the last download.

        Raises:
            ConfigurationError: no download carried it yet.
        """
        if name not in self._received:
            raise ConfigurationError(
                f"{name!r} has not been downloaded yet: {type(self).__name__} serves it with the model, so read it "
                "after api.download() returned True")
        return self._received[name]

    def stage(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Frontend: attach named extras to the next upload (client-side helpers call this).

        Raises:
            ConfigurationError: a name is not an upload extra of :meth:`extra_layout`, or a
                tensor's dtype or shape differs from it.
        """
        _, upload = self.extra_layout()
        for name, tensor in tensors.items():
            if name not in upload:
                raise ConfigurationError(f"{type(self).__name__} uploads no extra {name!r}; its upload extras are "
                                         f"{sorted(upload)[:4]}")
            dtype, shape = upload[name]
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tuple(tensor.shape) != shape:
                got = f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ConfigurationError(f"extra {name!r} must be a {dtype} tensor of shape {shape}, got {got}")
            self._staged[name] = tensor.detach()

    def frontend_extras(self) -> Dict[str, torch.Tensor]:
        """Frontend: the extras staged for this upload, handed over (the next upload stages anew)."""
        staged, self._staged = self._staged, {}
        return staged

    # ----------------------------------------------------------------- accumulation
    def add(self, tensors: Mapping[str, torch.Tensor], num_samples: int, weight: float = 1.0,
            peak: Optional[float] = None, context: Optional[Mapping[str, Any]] = None) -> None:
        """Accumulates one accepted upload (see :meth:`Aggregator.add`).

        Args:
            context: what the backend knows of the upload: ``client``, ``version`` (trained from),
                ``staleness``, ``asynchronous`` and ``max_staleness``. Without it the upload is
                taken as trained from the current global model.

        Raises:
            ConfigurationError: as :meth:`Aggregator.add`; or, asynchronously, ``max_staleness``
                is None, or the upload was trained from a version whose model is no longer kept.
        """
        version = self._note(context)
        if self.max_norm is not None:
            tensors = self._clipped(tensors, self._reference(version))
            peak = None
        self._record(tensors, num_samples, weight, peak, context)
        self._plain.append(float(self.effective_weight(num_samples, 1.0)))
        self._by_version.setdefault(version, []).append(self._weights[-1])

    def _record(self, tensors: Mapping[str, torch.Tensor], num_samples: int, weight: float,
                peak: Optional[float], context: Optional[Mapping[str, Any]]) -> None:
        """Adds the (clipped) upload to the running sums; robust aggregators keep it instead."""
        super().add(tensors, num_samples, weight, peak)

    def _note(self, context: Optional[Mapping[str, Any]]) -> int:
        """Learns the global version and the asynchronous settings from ``context``; returns the
        version the upload was trained from (the global one without a context)."""
        if context is None:
            return self._global if self._global is not None else -1
        version, staleness = int(context["version"]), int(context["staleness"])
        self._global = version + staleness
        self._asynchronous = bool(context.get("asynchronous", False))
        self._max_staleness = context.get("max_staleness", 0)
        if self._asynchronous and self._max_staleness is None:
            raise ConfigurationError(
                f"{type(self).__name__} applies asynchronous uploads as updates of the version each was trained "
                "from, so it keeps the global parameters of the versions an upload may come from: set "
                "Asynchronous(max_staleness=...) to bound them")
        return version

    def _reference(self, version: int) -> Dict[str, torch.Tensor]:
        """The global parameters an upload trained from ``version`` started from."""
        if self._global is None or version == self._global:
            return {name: param.detach() for name, param in zip(self.param_names, self._params)}
        kept = self._history.get(version)
        if kept is None:
            raise ConfigurationError(
                f"an upload trained from version {version} arrived at version {self._global}, but "
                f"{type(self).__name__} keeps the models of versions {sorted(self._history)[:3]}...; "
                "resume from a checkpoint written by this aggregator, with the same max_staleness")
        return kept

    def _clipped(self, tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
                 ) -> Dict[str, torch.Tensor]:
        """``tensors`` with every parameter moved to ``ref + factor * (y - ref)`` in float64, the
        factor clipping the update's norm to ``max_norm``."""
        names = self.param_names
        self._check_names(tensors)
        update = [tensors[n].detach().double() - reference[n].double() for n in names]
        _, factor = clip_update(update, self.max_norm)
        if factor < 1.0:
            self.clipped += 1
            update = [u * factor for u in update]
        out = dict(tensors)
        for name, u in zip(names, update):
            out[name] = reference[name].double() + u
        return out

    # ----------------------------------------------------------------- aggregation
    def aggregate(self, current: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Returns the new global value of every entry (parameters after the server step; the upload
        extras are used, not returned), then starts the next version; asynchronously, keeps
        ``current``'s parameters for late uploads.

        Raises:
            ConfigurationError: as :meth:`Aggregator.aggregate`, or a subclass's check of the
                number of uploads.
        """
        self._results = None
        global_version = self._global
        try:
            result = self._aggregate(current)
        finally:
            self._results = None
        _, upload = self.extra_layout()
        result = {name: value for name, value in result.items() if name not in upload}
        if self._asynchronous and global_version is not None:
            self._history[global_version] = {n: current[n].detach().clone() for n in self.param_names}
            oldest = global_version + 1 - int(self._max_staleness or 0)
            self._history = {v: kept for v, kept in self._history.items() if v >= oldest}
        self._global = None if global_version is None else global_version + 1
        return result

    def _aggregate(self, current: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return super().aggregate(current)

    def _finish(self, name: str, current: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self._results is None:
            self._results = self._compute(current)
        if name in self._results:
            return self._results[name]
        return super()._finish(name, current)

    def _compute(self, current: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The new parameters (and anything else a subclass computes at once), from the sums."""
        return self._step_params(current, self._pseudo_gradient(current))

    def _synchronous(self) -> bool:
        """Whether every upload of this version was trained from the current global model."""
        return not self._asynchronous and set(self._by_version) <= {self._global if self._global is not None else -1}

    def _pseudo_gradient(self, current: Mapping[str, torch.Tensor]) -> Optional[Dict[str, torch.Tensor]]:
        """``reference - aggregate`` per parameter (float64); None for the plain weighted mean."""
        if self.server is None and self._synchronous():
            return None
        plain = math.fsum(self._plain)
        reference = self._reference_sum(current)
        return {n: (reference[n] - self._sum_of(n, torch.float64)) / plain for n in self.param_names}

    def _reference_sum(self, current: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``sum_v W_v * x_v`` per parameter (float64), ``W_v`` the weights of the uploads trained
        from version ``v`` and ``x_v`` that version's parameters, in version order."""
        out = {n: torch.zeros(current[n].shape, dtype=torch.float64) for n in self.param_names}
        for version in sorted(self._by_version):
            total = math.fsum(self._by_version[version])
            if version == self._global or self._global is None:
                start = {n: current[n].detach() for n in self.param_names}
            else:
                start = self._reference(version)
            for name in self.param_names:
                out[name] += total * start[name].double()
        return out

    def _step_params(self, current: Mapping[str, torch.Tensor],
                     gradient: Optional[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """The new parameters: the weighted mean when ``gradient`` is None, else the server step
        (``x - g`` without a server optimizer)."""
        names = self.param_names
        if gradient is None:
            return {n: finish_mean(self._sum_of(n, torch.float64), self.total_weight, current[n].dtype) for n in names}
        x = {n: current[n].detach().double() for n in names}
        new = self.server.step(x, gradient) if self.server is not None else {n: x[n] - gradient[n] for n in names}
        return {n: new[n].to(current[n].dtype) for n in names}

    def reset(self) -> None:
        """Forgets the uploads of this version (server state and kept models stay)."""
        super().reset()
        self._plain = []
        self._by_version = {}

    # ----------------------------------------------------------------- checkpoints
    _BASE_KEYS = ("count", "weights", "shapes", "dtypes", "sum")

    def state_dict(self) -> Dict[str, Any]:
        """The accumulation (:meth:`Aggregator.state_dict`) plus the weights per version, the kept
        global parameters, the server optimizer's state and :meth:`server_state`."""
        state = self._base_state()
        state["updates"] = {
            "plain": list(self._plain),
            "by_version": {str(v): list(w) for v, w in self._by_version.items()},
            "global": -1 if self._global is None else self._global,
            "asynchronous": self._asynchronous,
            "max_staleness": -1 if self._max_staleness is None else int(self._max_staleness),
            "history": {str(v): {n: t.clone() for n, t in kept.items()} for v, kept in self._history.items()},
            "server": None if self.server is None else self.server.state_dict(),
            "own": self.server_state(),
        }
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what :meth:`state_dict` returned.

        Raises:
            ConfigurationError: ``state`` was not written by this kind of aggregator, or with
                another server optimizer.
        """
        if not isinstance(state, Mapping) or "updates" not in state:
            raise ConfigurationError(f"the saved aggregator state was not written by {type(self).__name__} "
                                     "(it has no 'updates'); resume with the aggregator the checkpoint was written with")
        updates = state["updates"]
        if (updates["server"] is None) != (self.server is None):
            raise ConfigurationError(f"the checkpoint was written {'with' if updates['server'] is not None else 'without'} "
                                     f"a server optimizer in {type(self).__name__}; resume with the same server=")
        self._load_base({k: v for k, v in state.items() if k != "updates"})
        self._plain = [float(w) for w in updates["plain"]]
        self._by_version = {int(v): [float(x) for x in w] for v, w in updates["by_version"].items()}
        self._global = None if int(updates["global"]) < 0 else int(updates["global"])
        self._asynchronous = bool(updates["asynchronous"])
        self._max_staleness = None if int(updates["max_staleness"]) < 0 else int(updates["max_staleness"])
        self._history = {int(v): {n: t.clone() for n, t in kept.items()} for v, kept in updates["history"].items()}
        if self.server is not None:
            self.server.load_state_dict(updates["server"])
        self.load_server_state(updates["own"])

    def _base_state(self) -> Dict[str, Any]:
        return super().state_dict()

    def _load_base(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)

    def server_state(self) -> Dict[str, Any]:
        """The state a subclass keeps across versions (control variates, ...): tensors and numbers."""
        return {}

    def load_server_state(self, state: Mapping[str, Any]) -> None:
        """Restores what :meth:`server_state` returned."""

    # ----------------------------------------------------------------- names
    def _check_names(self, tensors: Mapping[str, torch.Tensor]) -> None:
        _, upload = self.extra_layout()
        missing = [name for name in upload if name not in tensors]
        if missing:
            raise ConfigurationError(f"the upload lacks the extras {missing[:3]} that {type(self).__name__} needs")
        super()._check_names({n: t for n, t in tensors.items() if n not in upload})

    def __repr__(self) -> str:
        server = "" if self.server is None else f", server={self.server!r}"
        clip = "" if self.max_norm is None else f", max_norm={self.max_norm}"
        return f"{type(self).__name__}(weighted={self.weighted}{server}{clip})"


class Mean(UpdateAggregator):
    """The weighted (FedAvg) or plain mean of the uploads, with an optional server optimizer and
    norm clipping.

    Synchronously and without ``server`` it gives FedAvg bit for bit (the same as
    :class:`~openfl_api.aggregate.AverageAggregator`, or :class:`~openfl_api.aggregate.NaiveAggregator`
    with ``weighted=False``). With ``server=FedAvgM(lr, momentum)``, ``FedAdagrad``, ``FedAdam`` or
    ``FedYogi``, the parameters move by that optimizer on ``x - mean y``. Asynchronously (with
    ``AggregateCount(K)`` this is FedBuff) the pseudo-gradient is the staleness-weighted mean of the
    updates ``x_from - y`` and the server step applies it (``x - g`` without ``server``).

    Args:
        params: the model's parameters, e.g. ``net.parameters()``.
        weighted: weight by ``num_samples`` (FedAvg); False gives every upload the same weight.
        server: a server optimizer, or None.
        max_norm: clip each update's L2 norm to this value; None does not clip.
        state_keys: optimizer-state keys per parameter to aggregate along with the model.
    """

    def __init__(self, params: Iterable[torch.Tensor], *, weighted: bool = True,
                 server: Optional[ServerOptimizer] = None, max_norm: Optional[float] = None,
                 state_keys: Sequence[str] = ()) -> None:
        super().__init__(params, server=server, max_norm=max_norm, state_keys=state_keys, weighted=weighted)
