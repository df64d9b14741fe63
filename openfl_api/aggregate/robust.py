"""Byzantine-robust aggregation: coordinate-wise Median and TrimmedMean, Krum, Multi-Krum and Bulyan.

Pure functions over a stack of flattened uploads (``points``, shape ``(n, d)``, float64) say how
the rules combine; the aggregator classes keep every upload of a version, since these rules need
all of them at once (memory grows with the uploads per version, unlike the running sums of
:class:`~openfl_api.aggregate.Mean`), and apply the rule when the version is aggregated:

- :func:`median`: per coordinate, the median (the mean of the two middle values for even ``n``);
  Yin et al., ICML 2018, arXiv:1803.01498.
- :func:`trimmed_mean`: per coordinate, drop the ``b = floor(beta * n)`` largest and smallest values
  and average the rest; Yin et al., 2018.
- :func:`krum_scores` / :func:`krum`: score each point by the summed squared distances to its
  ``n - f - 2`` nearest others and keep the ``m`` lowest (``m = 1``: Krum, ``m > 1``: Multi-Krum,
  averaged); Blanchard et al., NeurIPS 2017. Needs ``n > 2f + 2``.
- :func:`bulyan`: select ``n - 2f`` points by repeated Krum, then per coordinate average the
  ``n - 4f`` selected values closest to their median; El Mhamdi et al., ICML 2018,
  arXiv:1802.07927. Needs ``n >= 4f + 3``.

The rules ignore ``num_samples`` (as the papers and Flower do); Multi-Krum may weight its
selection by it (``weighted=True``, Flower's choice). Uploads are ordered by client id (then the
version they were trained from) before a rule sees them, never by arrival, so ties resolve the
same way whatever the order in which uploads came: Krum's tie goes to the lowest client id.

Synchronously and without a server optimizer the rules apply to the uploaded models themselves
(the median of identical uploads is that upload, bit for bit); otherwise to the updates
``s_i * (y_i - x_from_i)`` (staleness weight ``s_i``), and the server step applies the result.
Selection rules (Krum, Bulyan) measure distances over the parameters and take every entry
(buffers, optimizer state, extras) from the uploads they select; Median and TrimmedMean apply per
coordinate to every floating entry. Integer entries take the rule's result rounded to the nearest
integer.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Dict, List, Optional, Tuple

import torch

from openfl_api.aggregate.base import check_layout
from openfl_api.aggregate.server_opt import ServerOptimizer
from openfl_api.aggregate.updates import UpdateAggregator
from openfl_api.errors import ConfigurationError

__all__ = [
    "median",
    "trimmed_mean",
    "krum_scores",
    "krum",
    "bulyan",
    "bulyan_select",
    "bulyan_combine",
    "RobustAggregator",
    "Median",
    "TrimmedMean",
    "Krum",
    "MultiKrum",
    "Bulyan",
]


# ----------------------------------------------------------------- the rules, as pure functions
def median(points: torch.Tensor) -> torch.Tensor:
    """Per coordinate, the median of ``points`` (shape ``(n, ...)``); for even ``n`` the mean of the
    two middle values (numpy's convention, not torch.median's lower one)."""
    ordered = torch.sort(points, dim=0).values
    n = ordered.shape[0]
    if n % 2:
        return ordered[n // 2].clone()
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(points: torch.Tensor, trim: int) -> torch.Tensor:
    """Per coordinate, the mean of ``points`` (shape ``(n, ...)``) without the ``trim`` largest and
    ``trim`` smallest values; ``0 <= trim < n / 2``. The kept values are summed in sorted order."""
    n = points.shape[0]
    if not 0 <= trim < n / 2:
        raise ConfigurationError(f"trim must be in [0, n/2) = [0, {n / 2:g}), got {trim}")
    ordered = torch.sort(points, dim=0).values
    return ordered[trim:n - trim].sum(dim=0) / (n - 2 * trim)


def krum_scores(points: torch.Tensor, f: int) -> torch.Tensor:
    """Krum's score of each row of ``points`` (shape ``(n, d)``): the sum of its squared distances
    to its ``n - f - 2`` nearest other rows (at least one; all others when fewer exist)."""
    n = points.shape[0]
    neighbours = max(1, min(n - 1, n - f - 2))
    scores = []
    for i in range(n):
        squared = ((points - points[i]) ** 2).sum(dim=1)
        others = torch.cat([squared[:i], squared[i + 1:]])
        scores.append(torch.sort(others).values[:neighbours].sum() if n > 1 else squared.new_zeros(()))
    return torch.stack(scores)


def krum(points: torch.Tensor, f: int, m: int = 1) -> List[int]:
    """The rows Krum (``m = 1``) or Multi-Krum keeps: the ``m`` lowest :func:`krum_scores`, ties to
    the lower row index, in score order."""
    scores = krum_scores(points, f)
    return torch.sort(scores, stable=True).indices[:m].tolist()


def bulyan_select(points: torch.Tensor, f: int) -> List[int]:
    """Bulyan's first stage: the ``n - 2f`` rows of ``points`` that Krum, applied again and again to
    the rows not selected yet, selects, in the order selected."""
    remaining = list(range(points.shape[0]))
    selected: List[int] = []
    for _ in range(points.shape[0] - 2 * f):
        best = krum(points[remaining], f, 1)[0]
        selected.append(remaining.pop(best))
    return selected


def bulyan_combine(chosen: torch.Tensor, f: int) -> torch.Tensor:
    """Bulyan's second stage: per coordinate, the mean of the ``len(chosen) - 2f`` values of
    ``chosen`` (shape ``(theta, ...)``) closest to their median; among equal distances the smaller
    value counts first, and the kept values are summed in that order."""
    beta = chosen.shape[0] - 2 * f
    centre = median(chosen)
    order = torch.sort(chosen, dim=0).indices
    by_value = torch.gather(chosen, 0, order)
    nearest = torch.sort(torch.gather((chosen - centre).abs(), 0, order), dim=0, stable=True).indices[:beta]
    return torch.gather(by_value, 0, nearest).sum(dim=0) / beta


def bulyan(points: torch.Tensor, f: int) -> Tuple[torch.Tensor, List[int]]:
    """Bulyan over the rows of ``points`` (shape ``(n, d)``): ``(aggregate, selected rows)``, with
    :func:`bulyan_select` then :func:`bulyan_combine`; needs ``n >= 4f + 3``."""
    selected = bulyan_select(points, f)
    return bulyan_combine(points[selected], f), selected


# ----------------------------------------------------------------- the aggregators
def _client_order(client: str) -> Tuple[int, int, str]:
    """Natural order of client ids (:func:`openfl_api.versions.client_order`, imported here late:
    the versions module imports the aggregate package)."""
    from openfl_api.versions import client_order

    return client_order(client)


def _count(value: Any, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigurationError(f"{what} must be an int >= {low}, got {value!r}")
    return int(value)


class RobustAggregator(UpdateAggregator):
    """Base of the rules that need every upload of a version: keeps them, in client-id order.

    Subclasses say how many uploads they need (:meth:`needs`) and combine them
    (:meth:`_combine`). See the module docstring for what the rules see and return.

    Args:
        params: the model's parameters, e.g. ``net.parameters()``.
        server: a server optimizer applied to the robust aggregate's pseudo-gradient, or None.
        max_norm: clip each upload's parameter update to this L2 norm first; None does not clip.
        state_keys: optimizer-state keys per parameter to aggregate along with the model.
    """

    def __init__(self, params: Iterable[torch.Tensor], *, server: Optional[ServerOptimizer] = None,
                 max_norm: Optional[float] = None, state_keys: Sequence[str] = (), weighted: bool = False) -> None:
        super().__init__(params, server=server, max_norm=max_norm, state_keys=state_keys, weighted=weighted)
        # (client order key, trained-from version, arrival among that client's uploads of it) -> upload
        self._kept: Dict[Tuple[Any, int, int], Dict[str, Any]] = {}

    # ----------------------------------------------------------------- what a rule needs
    def needs(self) -> Tuple[int, str]:
        """``(least uploads per version, the rule in words)``."""
        return 1, "at least one upload"

    def _check_count(self, n: int) -> None:
        least, rule = self.needs()
        if n < least:
            raise ConfigurationError(
                f"{self!r} needs at least {least} uploads per version ({rule}); this version has {n}. Aggregate "
                f"with AggregateCount(count={least}) or more, or lower f")

    # ----------------------------------------------------------------- accumulation
    def _record(self, tensors: Mapping[str, torch.Tensor], num_samples: int, weight: float,
                peak: Optional[float], context: Optional[Mapping[str, Any]]) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 0:
            raise ConfigurationError(f"num_samples must be an int >= 0; got {num_samples!r}")
        if (isinstance(weight, bool) or not isinstance(weight, numbers.Real)
                or not (math.isfinite(weight) and weight >= 0)):
            raise ConfigurationError(f"weight must be a finite number >= 0; got {weight!r}")
        self._check_names(tensors)
        if self._count:
            check_layout(self, tensors)
        else:
            self._shapes = {name: tuple(x.shape) for name, x in tensors.items()}
            self._dtypes = {name: x.dtype for name, x in tensors.items()}
        client = str(context["client"]) if context is not None else str(len(self._kept))
        version = int(context["version"]) if context is not None else -1
        arrival = sum(1 for key in self._kept if key[0] == _client_order(client) and key[1] == version)
        self._kept[(_client_order(client), version, arrival)] = {
            "client": client, "version": version, "weight": float(weight),
            "num_samples": int(num_samples),
            "tensors": {name: x.detach().clone() for name, x in tensors.items()},
        }
        self._count += 1
        self._weights.append(float(self.effective_weight(num_samples, weight)))

    @property
    def total_weight(self) -> float:
        return math.fsum(self._weights)

    def reset(self) -> None:
        super().reset()
        self._kept = {}

    # ----------------------------------------------------------------- aggregation
    def _aggregate(self, current: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        if not self._count:
            raise ConfigurationError("aggregate() needs at least one upload; add() was not called since the last "
                                     "aggregate() or reset()")
        self._check_count(self._count)
        uploads = [self._kept[key] for key in sorted(self._kept)]
        on_models = self.server is None and self._synchronous()
        names = list(self._shapes)
        params = set(self.param_names)
        rows: Dict[str, torch.Tensor] = {}
        for name in names:
            stack = torch.stack([u["tensors"][name].to(torch.float64) for u in uploads])
            if name in params and not on_models:
                starts = torch.stack([self._reference(u["version"])[name].to(torch.float64) for u in uploads])
                stack = stack - starts
                factors = torch.tensor([u["weight"] for u in uploads], dtype=torch.float64)
                if not bool((factors == 1.0).all()):
                    stack = stack * factors.reshape(-1, *([1] * (stack.dim() - 1)))
            rows[name] = stack
        combined = self._combine(rows, [u["num_samples"] for u in uploads])
        result: Dict[str, torch.Tensor] = {}
        gradient: Dict[str, torch.Tensor] = {}
        for name in names:
            value = combined[name]
            if name in params and not on_models:
                gradient[name] = -value
                continue
            dtype = current[name].dtype if name in current else self._dtypes[name]
            result[name] = _cast(value, dtype)
        if gradient:
            result.update(self._step_params(current, gradient))
        self.reset()
        return result

    def _combine(self, rows: Dict[str, torch.Tensor], num_samples: List[int]) -> Dict[str, torch.Tensor]:
        """Entry name -> the rule's result, from ``rows`` (entry -> stacked uploads, float64)."""
        raise NotImplementedError

    def _flat_params(self, rows: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The parameters of every upload as one row each, for distances."""
        return torch.cat([rows[n].reshape(rows[n].shape[0], -1) for n in self.param_names], dim=1)

    # ----------------------------------------------------------------- checkpoints
    def _base_state(self) -> Dict[str, Any]:
        live = self._count > 0
        return {"count": self._count, "weights": list(self._weights),
                "shapes": {name: list(shape) for name, shape in self._shapes.items()} if live else {},
                "dtypes": dict(self._dtypes) if live else {}, "sum": None,
                "kept": [dict(self._kept[key]) for key in sorted(self._kept)]}

    def _load_base(self, state: Mapping[str, Any]) -> None:
        kept = state.get("kept")
        if not isinstance(kept, list):
            raise ConfigurationError(f"the saved aggregator state was not written by {type(self).__name__}: "
                                     "it keeps no uploads")
        self.reset()
        self._count = int(state["count"])
        self._weights = [float(w) for w in state["weights"]]
        self._shapes = {n: tuple(s) for n, s in state["shapes"].items()}
        self._dtypes = dict(state["dtypes"])
        arrivals: Dict[Tuple[Any, int], int] = {}
        for upload in kept:
            key = (_client_order(upload["client"]), int(upload["version"]))
            arrival = arrivals[key] = arrivals.get(key, -1) + 1
            self._kept[(*key, arrival)] = {
                "client": str(upload["client"]), "version": int(upload["version"]),
                "weight": float(upload["weight"]), "num_samples": int(upload["num_samples"]),
                "tensors": {n: t.clone() for n, t in upload["tensors"].items()}}
        if len(self._kept) != self._count:
            raise ConfigurationError("the saved aggregator state keeps another number of uploads than it counted")


def _cast(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bool:
        return value >= 0.5
    if dtype.is_floating_point or dtype.is_complex:
        return value.to(dtype)
    return value.round().to(dtype)


class Median(RobustAggregator):
    """The coordinate-wise median of the uploads (Yin et al., 2018).

    Args:
        params: the model's parameters, e.g. ``net.parameters()``.
        f: malicious uploads to tolerate; the aggregation refuses versions with fewer than
            ``2f + 1`` uploads (a majority must be honest). 0 checks nothing.
        server, max_norm, state_keys: as :class:`RobustAggregator`.
    """

    def __init__(self, params: Iterable[torch.Tensor], *, f: int = 0, server: Optional[ServerOptimizer] = None,
                 max_norm: Optional[float] = None, state_keys: Sequence[str] = ()) -> None:
        super().__init__(params, server=server, max_norm=max_norm, state_keys=state_keys)
        self.f = _count(f, "Median(f=...)", 0)

    def needs(self) -> Tuple[int, str]:
        return 2 * self.f + 1, f"n >= 2f + 1 with f = {self.f}"

    def _combine(self, rows: Dict[str, torch.Tensor], num_samples: List[int]) -> Dict[str, torch.Tensor]:
        return {name: median(stack) for name, stack in rows.items()}

    def __repr__(self) -> str:
        return f"Median(f={self.f})"


class TrimmedMean(RobustAggregator):
    """The coordinate-wise trimmed mean (Yin et al., 2018): per coordinate, drop the
    ``b = floor(beta * n)`` largest and smallest values of the ``n`` uploads, average the rest.

    Args:
        params: the model's parameters, e.g. ``net.parameters()``.
        beta: the fraction trimmed on each side, in ``[0, 0.5)``; 0 is the plain mean. A version
            whose ``floor(beta * n)`` is 0 for ``beta > 0`` (nothing would be trimmed) is refused.
        server, max_norm, state_keys: as :class:`RobustAggregator`.
    """

    def __init__(self, params: Iterable[torch.Tensor], *, beta: float = 0.1, server: Optional[ServerOptimizer] = None,
                 max_norm: Optional[float] = None, state_keys: Sequence[str] = ()) -> None:
        super().__init__(params, server=server, max_norm=max_norm, state_keys=state_keys)
        if (isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(beta)
                or not 0 <= beta < 0.5):
            raise ConfigurationError(f"TrimmedMean(beta=...) must be a fraction in [0, 0.5), got {beta!r}")
        self.beta = float(beta)

    def trim(self, n: int) -> int:
        """Uploads dropped on each side when a version has ``n``: ``floor(beta * n)``."""
        return int(math.floor(self.beta * n))

    def needs(self) -> Tuple[int, str]:
        if self.beta == 0:
            return 1, "beta = 0 trims nothing"
        least = math.ceil(1 / self.beta)
        while self.trim(least) < 1:
            least += 1
        return least, f"floor(beta * n) >= 1 to trim anything, with beta = {self.beta:g}"

    def _combine(self, rows: Dict[str, torch.Tensor], num_samples: List[int]) -> Dict[str, torch.Tensor]:
        trim = self.trim(len(num_samples))
        return {name: trimmed_mean(stack, trim) for name, stack in rows.items()}

    def __repr__(self) -> str:
        return f"TrimmedMean(beta={self.beta:g})"


class Krum(RobustAggregator):
    """Krum and Multi-Krum (Blanchard et al., 2017): keep the ``m`` uploads with the lowest Krum
    scores and average them (``m = 1``: Krum returns one upload as it came).

    Args:
        params: the model's parameters, e.g. ``net.parameters()``.
        f: malicious uploads to tolerate, >= 0; a version needs ``n > 2f + 2`` uploads.
        m: uploads kept, >= 1 (``n - f`` is the paper's Multi-Krum); at most ``n``.
        weighted: average the kept uploads weighted by ``num_samples`` (Flower) instead of equally.
        server, max_norm, state_keys: as :class:`RobustAggregator`.
    """

    def __init__(self, params: Iterable[torch.Tensor], *, f: int, m: int = 1, weighted: bool = False,
                 server: Optional[ServerOptimizer] = None, max_norm: Optional[float] = None,
                 state_keys: Sequence[str] = ()) -> None:
        super().__init__(params, server=server, max_norm=max_norm, state_keys=state_keys, weighted=weighted)
        self.f = _count(f, f"{type(self).__name__}(f=...)", 0)
        self.m = _count(m, f"{type(self).__name__}(m=...)", 1)
        self.selected: List[str] = []  # the client ids kept at the last aggregation

    def needs(self) -> Tuple[int, str]:
        return max(2 * self.f + 3, self.m), f"n > 2f + 2 with f = {self.f}, and n >= m = {self.m}"

    def _combine(self, rows: Dict[str, torch.Tensor], num_samples: List[int]) -> Dict[str, torch.Tensor]:
        keep = krum(self._flat_params(rows), self.f, self.m)
        uploads = [self._kept[key] for key in sorted(self._kept)]
        self.selected = [uploads[i]["client"] for i in keep]
        keep = sorted(keep)  # summed in client order
        if len(keep) == 1:
            return {name: stack[keep[0]].clone() for name, stack in rows.items()}
        weights = torch.tensor([float(num_samples[i]) if self.weighted else 1.0 for i in keep], dtype=torch.float64)
        out = {}
        for name, stack in rows.items():
            chosen = stack[keep]
            out[name] = (chosen * weights.reshape(-1, *([1] * (chosen.dim() - 1)))).sum(dim=0) / weights.sum()
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(f={self.f}, m={self.m})"


class MultiKrum(Krum):
    """Multi-Krum: :class:`Krum` keeping ``m`` uploads (default ``n - f``, the paper's choice).

    Args:
        params: the model's parameters, e.g. ``net.parameters()``.
        f: malicious uploads to tolerate, >= 0; a version needs ``n > 2f + 2`` uploads.
        m: uploads kept; None keeps ``n - f`` of the ``n`` uploads of each version.
        weighted, server, max_norm, state_keys: as :class:`Krum`.
    """

    def __init__(self, params: Iterable[torch.Tensor], *, f: int, m: Optional[int] = None, weighted: bool = False,
                 server: Optional[ServerOptimizer] = None, max_norm: Optional[float] = None,
                 state_keys: Sequence[str] = ()) -> None:
        super().__init__(params, f=f, m=1 if m is None else m, weighted=weighted, server=server,
                         max_norm=max_norm, state_keys=state_keys)
        self._all_but_f = m is None

    def _combine(self, rows: Dict[str, torch.Tensor], num_samples: List[int]) -> Dict[str, torch.Tensor]:
        if self._all_but_f:
            self.m = len(num_samples) - self.f
        return super()._combine(rows, num_samples)

    def __repr__(self) -> str:
        return f"MultiKrum(f={self.f}, m={'n - f' if self._all_but_f else self.m})"


class Bulyan(RobustAggregator):
    """Bulyan (El Mhamdi et al., 2018): ``n - 2f`` uploads selected by repeated Krum, then per
    coordinate the mean of the ``n - 4f`` selected values closest to their median.

    Args:
        params: the model's parameters, e.g. ``net.parameters()``.
        f: malicious uploads to tolerate, >= 0; a version needs ``n >= 4f + 3`` uploads.
        server, max_norm, state_keys: as :class:`RobustAggregator`.
    """

    def __init__(self, params: Iterable[torch.Tensor], *, f: int, server: Optional[ServerOptimizer] = None,
                 max_norm: Optional[float] = None, state_keys: Sequence[str] = ()) -> None:
        super().__init__(params, server=server, max_norm=max_norm, state_keys=state_keys)
        self.f = _count(f, "Bulyan(f=...)", 0)
        self.selected: List[str] = []

    def needs(self) -> Tuple[int, str]:
        return 4 * self.f + 3, f"n >= 4f + 3 with f = {self.f}"

    def _combine(self, rows: Dict[str, torch.Tensor], num_samples: List[int]) -> Dict[str, torch.Tensor]:
        selected = bulyan_select(self._flat_params(rows), self.f)
        uploads = [self._kept[key] for key in sorted(self._kept)]
        self.selected = [uploads[i]["client"] for i in selected]
        return {name: bulyan_combine(stack[selected], self.f) for name, stack in rows.items()}

    def __repr__(self) -> str:
        return f"Bulyan(f={self.f})"
