"""The :class:`Aggregator` base class: running weighted sums of uploads, one exact sum per entry."""

from __future__ import annotations

import abc
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from openfl_api.aggregate.exact import ExactSum
from openfl_api.aggregate.functional import finish_mean
from openfl_api.errors import ConfigurationError

__all__ = ["Aggregator"]

OPTIM_PREFIX = "optim"
EXTRA_PREFIX = "extra"


class Aggregator(abc.ABC):
    """Accumulates accepted uploads as they arrive, so backend memory stays O(model) at any scale.

    Memory does not grow with the number of clients: each upload is added into one running sum
    per entry and dropped.

    One aggregator object exists on every rank, since one script runs everywhere. The backend
    calls :meth:`add` for each accepted upload and :meth:`aggregate` once per version; a frontend
    only calls :meth:`frontend_extras` (and whatever tracking a subclass offers) to attach extra
    tensors to its upload.

    An upload maps entry names to tensors:

    * every ``state_dict`` key of the model, parameters and buffers (``"0.weight"``,
      ``"bn.running_mean"``, ``"bn.num_batches_tracked"``);
    * ``f"optim/{key}/{param_name}"`` for each key in :attr:`state_keys`;
    * ``f"extra/{key}/{param_name}"`` for each key in :attr:`upload_keys`.

    The entries are summed, weighted, into one :class:`~openfl_api.aggregate.exact.ExactSum`,
    whose bits do not depend on the order of the adds (integer sums at fixed levels); its buffers
    are kept for later rounds while the layout stays the same. The total weight is summed exactly
    too (``math.fsum``), so an aggregate is the same whatever order the uploads came in.
    The first upload of a round fixes the entry names, shapes and dtypes; the others must match it.

    Subclasses say how an upload is weighted (:meth:`effective_weight`) and may override
    ``_finish(name, current)`` to turn one entry's sum into its new global value.

    Attributes:
        state_keys: optimizer-state entries per parameter that ride along both ways,
            e.g. ``("momentum_buffer",)``.
        upload_keys: extra per-parameter tensors frontends upload; see :meth:`frontend_extras`.
    """

    upload_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable[torch.Tensor], state_keys: Sequence[str] = ()) -> None:
        """Creates an aggregator for ``params``.

        Args:
            params: the model's parameters, e.g. ``net.parameters()``, in ``state_dict`` order.
            state_keys: optimizer-state keys per parameter to aggregate along with the model.

        Raises:
            ConfigurationError: ``params`` is empty or holds a non-tensor, or a state key is not a
                non-empty str without ``'/'``.
        """
        self._params = list(params)
        if not self._params:
            raise ConfigurationError(
                "params must hold at least one tensor; got none (pass net.parameters() of a model "
                "that has parameters, and not an exhausted generator)"
            )
        for index, param in enumerate(self._params):
            if not isinstance(param, torch.Tensor):
                raise ConfigurationError(
                    f"params must hold tensors; item {index} is a {type(param).__name__}"
                )
        self.state_keys = _check_keys(state_keys, "state_keys")
        self._param_names: tuple[str, ...] | None = None
        self._param_set: frozenset[str] = frozenset()
        self._sum: ExactSum | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}  # entry -> shape, in the order of the sum
        self._dtypes: dict[str, torch.dtype] = {}
        self._values: dict[str, torch.Tensor] = {}  # the sums, while aggregate() finishes them
        self._count = 0
        self._weights: list[float] = []
        self._names_checked: tuple = ()
        self._kinds: list[tuple[bool, bool]] = []

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters this aggregator was created for (a new list of the same tensors)."""
        return list(self._params)

    def bind(self, names: Sequence[str]) -> None:
        """Names the parameters with their ``state_dict`` keys, in the order of :attr:`params`.

        Raises:
            ConfigurationError: ``names`` is not a sequence of distinct strings, one per parameter.
        """
        if isinstance(names, str):
            raise ConfigurationError(f"names must be a sequence of str, not the str {names!r}")
        names = tuple(names)
        if len(names) != len(self._params):
            raise ConfigurationError(
                f"bind() needs one name per parameter: {len(self._params)} parameters, "
                f"{len(names)} names"
            )
        for name in names:
            if not isinstance(name, str) or not name:
                raise ConfigurationError(f"parameter names must be non-empty str; got {name!r}")
        if len(set(names)) != len(names):
            raise ConfigurationError(f"parameter names must be distinct; got {names!r}")
        self._param_names = names
        self._param_set = frozenset(names)

    @property
    def param_names(self) -> tuple[str, ...]:
        """The parameters' ``state_dict`` keys given to :meth:`bind`.

        Raises:
            ConfigurationError: :meth:`bind` was not called yet.
        """
        if self._param_names is None:
            raise ConfigurationError(
                "the aggregator has no parameter names yet; call bind(names) with the state_dict "
                "key of each parameter first"
            )
        return self._param_names

    @property
    def count(self) -> int:
        """Number of uploads accumulated since the last :meth:`aggregate` or :meth:`reset`."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the effective weights of the uploads accumulated since the last reset, correctly
        rounded (``math.fsum``), so it does not depend on their order."""
        return math.fsum(self._weights)

    @abc.abstractmethod
    def effective_weight(self, num_samples: int, weight: float) -> float:
        """Returns the weight an upload of ``num_samples`` samples and caller ``weight`` gets."""

    def add(
        self, tensors: Mapping[str, torch.Tensor], num_samples: int, weight: float = 1.0,
        peak: float | None = None,
    ) -> None:
        """Accumulates one accepted upload.

        Nothing of ``tensors`` is kept: they may be views into a receive buffer that is reused
        afterwards. The upload is checked whole before anything is accumulated.

        Args:
            tensors: entry name to tensor; see the class docstring for the names.
            num_samples: samples the frontend trained on, ``>= 0``.
            weight: extra factor from the caller, finite and ``>= 0``.
            peak: the largest magnitude of the floating entries, when the caller knows it (the
                backend's finite check finds it); see :meth:`ExactSum.add_`.

        Raises:
            ConfigurationError: :meth:`bind` was not called, an argument is out of range, an entry
                name is unknown or missing, or an entry's shape or dtype differs from the
                round's first upload.
        """
        if (
            isinstance(num_samples, bool)
            or not isinstance(num_samples, numbers.Integral)
            or num_samples < 0
        ):
            raise ConfigurationError(f"num_samples must be an int >= 0; got {num_samples!r}")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, numbers.Real)
            or not (math.isfinite(weight) and weight >= 0)
        ):
            raise ConfigurationError(f"weight must be a finite number >= 0; got {weight!r}")
        # The names are checked once per layout: a backend adds uploads of one layout all along.
        names = (tuple(tensors), self._param_names, self.state_keys, self.upload_keys)
        if names != self._names_checked or not all(isinstance(x, torch.Tensor) for x in tensors.values()):
            self._check_names(tensors)
            self._names_checked = names
        if self._count:
            check_layout(self, tensors)
        else:
            self._allocate(tensors)
        effective = float(self.effective_weight(num_samples, weight))
        if not self._count:
            self._sum.zero_()
        self._sum.add_([tensors[name] for name in self._shapes], effective, peak)
        self._count += 1
        self._weights.append(effective)

    def aggregate(self, current: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Returns the new global value of every accumulated entry, then resets the accumulation.

        Model entries come back with the dtype of ``current``'s, optimizer and extra entries with
        the dtype they were uploaded in. Every returned tensor is fresh: later adds never change it.

        Args:
            current: the global model's ``state_dict`` before this round.

        Raises:
            ConfigurationError: nothing was added, the total weight is 0, or ``current`` lacks a
                model entry or holds it with another shape.
        """
        if not self._count:
            raise ConfigurationError(
                "aggregate() needs at least one upload; add() was not called since the last "
                "aggregate() or reset()"
            )
        if self.total_weight <= 0:
            raise ConfigurationError(
                f"aggregate() needs a positive total weight; the {self._count} uploads since the "
                "last reset all had weight 0 (num_samples or weight was 0)"
            )
        for name, shape in self._shapes.items():
            if _is_model_entry(name):
                if name not in current:
                    raise ConfigurationError(
                        f"current has no entry {name!r}; pass the global model's full state_dict()"
                    )
                if tuple(current[name].shape) != shape:
                    raise ConfigurationError(
                        f"current[{name!r}] has shape {tuple(current[name].shape)} but the uploads "
                        f"have {shape}"
                    )
        if type(self)._finish is Aggregator._finish and not any(self._sum.complex):
            # Every entry is its weighted mean: read straight out of the exact sums, no float64 copy.
            dtypes = [current[name].dtype if _is_model_entry(name) else self._dtypes[name] for name in self._shapes]
            result = dict(zip(self._shapes, self._sum.means(self.total_weight, dtypes)))
            self.reset()
            return result
        # The sums are read once, by _finish below, before this returns: the sum's buffer serves.
        self._values = dict(zip(self._shapes, self._sum.value(reuse=True)))
        try:
            with torch.no_grad():
                result = {name: self._finish(name, current) for name in self._shapes}
        finally:
            self._values = {}
        self.reset()
        return result

    def reset(self) -> None:
        """Forgets the uploads accumulated so far; buffers are kept and zeroed on the next add."""
        self._count = 0
        self._weights = []

    def state_dict(self) -> dict[str, Any]:
        """Returns the accumulation state, so a backend can resume a round exactly.

        Holds only tensors, dtypes and Python scalars, so ``torch.load(weights_only=True)`` reads
        it back: the count, every weight, the layout and the exact sum's integer level sums.
        """
        live = self._count > 0
        return {
            "count": self._count,
            "weights": list(self._weights),
            "shapes": {name: list(shape) for name, shape in self._shapes.items()} if live else {},
            "dtypes": dict(self._dtypes) if live else {},
            "sum": self._sum.state_dict() if live else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores the accumulation state saved by :meth:`state_dict`.

        Raises:
            ConfigurationError: ``state`` does not have the structure :meth:`state_dict` returns.
        """
        expected = {"count", "weights", "shapes", "dtypes", "sum"}
        if not isinstance(state, Mapping) or set(state) != expected:
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ConfigurationError(
                f"state must be a dict with keys {sorted(expected)}, as state_dict() returns; "
                f"got {got}"
            )
        count, weights, shapes, dtypes = state["count"], state["weights"], state["shapes"], state["dtypes"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigurationError(f"state['count'] must be an int >= 0; got {count!r}")
        if not isinstance(weights, list) or len(weights) != count or not all(_is_weight(w) for w in weights):
            raise ConfigurationError(
                f"state['weights'] must list one finite weight >= 0 per upload ({count}); got {str(weights)[:80]}"
            )
        if list(shapes) != list(dtypes) or not all(isinstance(d, torch.dtype) for d in dtypes.values()):
            raise ConfigurationError("state['shapes'] and state['dtypes'] must name the same entries, in order")
        if count:
            layout = {name: torch.empty(tuple(shape), dtype=dtypes[name], device="meta")
                      for name, shape in shapes.items()}
            self._allocate(layout)
            try:
                self._sum.load_state_dict(state["sum"])
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise ConfigurationError(f"state['sum'] does not fit the layout it was saved with: {exc}") from None
        self._count = count
        self._weights = [float(w) for w in weights]

    def frontend_extras(self) -> dict[str, torch.Tensor]:
        """Returns the tensors a frontend attaches to its upload: ``extra/{key}/{param_name}``.

        Empty unless the subclass has :attr:`upload_keys`.
        """
        return {}

    def _finish(self, name: str, current: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Returns the new global value of entry ``name``: its weighted mean in its output dtype."""
        dtype = current[name].dtype if _is_model_entry(name) else self._dtypes[name]
        return finish_mean(self._sum_of(name, dtype), self.total_weight, dtype)

    def _sum_of(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The exact sum of entry ``name`` in float64 (complex128 for complex entries); only while
        :meth:`aggregate` finishes the entries."""
        value = self._values[name]
        return torch.view_as_complex(value) if dtype.is_complex else value

    def _check_names(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Raises ConfigurationError unless ``tensors`` has all required and only known entries
        (:func:`check_names`; an aggregator with entries of its own checks them first)."""
        check_names(self, tensors)

    def _allocate(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Makes the exact sum for the layout of ``tensors``, reusing the one that still fits."""
        shapes = {name: tuple(x.shape) for name, x in tensors.items()}
        dtypes = {name: x.dtype for name, x in tensors.items()}
        kinds = [(x.is_floating_point() or x.is_complex(), x.is_complex()) for x in tensors.values()]
        if self._sum is None or shapes != self._shapes or kinds != self._kinds:
            self._sum = ExactSum(list(shapes.values()), floating=[f for f, _ in kinds], complex_=[c for _, c in kinds])
            self._kinds = kinds
        self._shapes = shapes
        self._dtypes = dtypes


def check_names(aggregator: Aggregator, tensors: Mapping[str, torch.Tensor]) -> None:
    """Raises ConfigurationError unless ``tensors`` has all required and only known entries."""
    param_names = aggregator.param_names
    known_keys = {OPTIM_PREFIX: aggregator.state_keys, EXTRA_PREFIX: aggregator.upload_keys}
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise ConfigurationError(f"entry {name!r} must be a tensor; got {type(x).__name__}")
        if _is_model_entry(name):
            continue
        prefix, _, rest = name.partition("/")
        key, _, param_name = rest.partition("/")
        if key not in known_keys.get(prefix, ()) or param_name not in aggregator._param_set:
            raise ConfigurationError(
                f"unknown entry {name!r}: names with '/' must be optim/{{key}}/{{param_name}} "
                f"with key in state_keys {aggregator.state_keys!r}, or extra/{{key}}/{{param_name}} "
                f"with key in upload_keys {aggregator.upload_keys!r}; param_name must be bound"
            )
    required = [
        *param_names,
        *(f"{OPTIM_PREFIX}/{key}/{p}" for key in aggregator.state_keys for p in param_names),
        *(f"{EXTRA_PREFIX}/{key}/{p}" for key in aggregator.upload_keys for p in param_names),
    ]
    missing = [name for name in required if name not in tensors]
    if missing:
        raise ConfigurationError(
            f"the upload lacks entries {missing!r}; every upload must carry each parameter "
            "and its optim/ and extra/ entries"
        )


def check_layout(aggregator: Aggregator, tensors: Mapping[str, torch.Tensor]) -> None:
    """Raises ConfigurationError unless ``tensors`` has the round's names, shapes and dtypes."""
    unknown = [name for name in tensors if name not in aggregator._shapes]
    if unknown:
        raise ConfigurationError(
            f"unknown entry {unknown[0]!r}: the first upload of this round did not carry it"
        )
    missing = [name for name in aggregator._shapes if name not in tensors]
    if missing:
        raise ConfigurationError(
            f"the upload lacks entries {missing!r} that the first upload of this round carried"
        )
    for name, x in tensors.items():
        if tuple(x.shape) != aggregator._shapes[name] or x.dtype != aggregator._dtypes[name]:
            raise ConfigurationError(
                f"entry {name!r} came as {x.dtype} {tuple(x.shape)} but the first upload of "
                f"this round had {aggregator._dtypes[name]} {aggregator._shapes[name]}"
            )


def _check_keys(keys: Sequence[str], what: str) -> tuple[str, ...]:
    """Returns ``keys`` as a tuple; raises ConfigurationError unless each is a str with no '/'."""
    if isinstance(keys, str):
        raise ConfigurationError(
            f"{what} must be a sequence of str, not the str {keys!r}; wrap it: ({keys!r},)"
        )
    keys = tuple(keys)
    for key in keys:
        if not isinstance(key, str) or not key or "/" in key:
            raise ConfigurationError(
                f"{what} entries must be non-empty str without '/'; got {key!r}"
            )
    if len(set(keys)) != len(keys):
        raise ConfigurationError(f"{what} must be distinct; got {keys!r}")
    return keys


def _is_weight(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _is_model_entry(name: str) -> bool:
    """Tells whether entry ``name`` is a model ``state_dict`` key: those never hold a '/'."""
    return "/" not in name
