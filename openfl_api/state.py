"""What travels between backend and frontends: the state_dict, optimizer state and extras.

Entry names on the wire:

- every key of the state_dict given to ``API.set_state_dict`` (parameters and buffers);
- ``optim/<key>/<param name>`` for each optimizer-state key the aggregator asks for
  (``AverageAggregator(params, state_keys=("momentum_buffer",))``), both ways;
- ``extra/<key>/<param name>`` for each tensor the aggregator needs from frontends
  (``ElasticAggregator``'s ``sensitivity``), uploads only;
- named extras, ``extra/<name>``, that an aggregator with an ``extra_layout()`` method declares for
  either direction (SCAFFOLD's control variates down and their changes up, FedNova's local step
  count up): the backend serves ``aggregator.download_extras()`` beside the model, a frontend hands
  what it downloaded to ``aggregator.receive_extras(tensors)`` and uploads what
  ``aggregator.frontend_extras()`` returns.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from openfl_api.errors import ConfigurationError
from openfl_api.payload import Schema, TensorSpec, dtype_name

__all__ = ["SharedState", "OPTIM", "EXTRA", "copy_all_"]

OPTIM = "optim"
EXTRA = "extra"

#: Downloads of at least this many bytes are copied into the model by two threads: a copy is
#: bound by memory bandwidth, which one core does not fill (46.8 MB: about 4.5 -> 3.5 ms in bench/transfer.py).
SPLIT_COPY_BYTES = 16 * 1024 * 1024
_copier: Optional[ThreadPoolExecutor] = None
_copier_lock = threading.Lock()


def copy_all_(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """Copy each of ``sources`` into the matching target, in place, with autograd off; CPU
    targets of :data:`SPLIT_COPY_BYTES` or more in all are split by bytes between this thread
    and a helper thread (torch copies without the interpreter lock)."""
    global _copier
    targets, sources = list(targets), list(sources)
    total = sum(t.numel() * t.element_size() for t in targets)
    if total < SPLIT_COPY_BYTES or len(targets) < 2 or any(t.device.type != "cpu" for t in targets):
        _copy_no_grad(targets, sources)
        return
    done, cut = 0, len(targets)
    for index, target in enumerate(targets):
        done += target.numel() * target.element_size()
        if done >= total / 2:
            cut = max(1, min(index + 1, len(targets) - 1))
            break
    with _copier_lock:
        if _copier is None:
            _copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openfl-copy")
    helper = _copier.submit(_copy_no_grad, targets[cut:], sources[cut:])
    try:
        _copy_no_grad(targets[:cut], sources[:cut])
    finally:
        helper.result()


def _copy_no_grad(targets: List[torch.Tensor], sources: List[torch.Tensor]) -> None:
    with torch.no_grad():  # grad mode is per thread
        for target, source in zip(targets, sources):
            target.copy_(source)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    return (
        a.device == b.device
        and a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


class SharedState:
    """The tensors one API exchanges, the schemas that describe them, and how to apply them.

    Args:
        state_dict: the model's tensors, best ``net.state_dict(keep_vars=True)``; received values
            are copied into these tensors in place.
        aggregator: the aggregator (its parameters are matched to state_dict keys by storage).
        optimizer: the local optimizer whose state rides along when the aggregator asks for it.
    """

    def __init__(self, state_dict: Mapping[str, torch.Tensor], aggregator: Any, optimizer: Optional[Any]) -> None:
        if not isinstance(state_dict, Mapping) or not state_dict:
            raise ConfigurationError(
                "set_state_dict needs a non-empty mapping of names to tensors, like "
                f"net.state_dict(keep_vars=True); got {type(state_dict).__name__}"
            )
        self.model: Dict[str, torch.Tensor] = {}
        for name, tensor in state_dict.items():
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise ConfigurationError(f"state_dict entry {name!r} must map a str to a tensor, got {type(tensor).__name__}")
            if name.startswith((f"{OPTIM}/", f"{EXTRA}/")):
                raise ConfigurationError(f"state_dict key {name!r} clashes with reserved prefixes optim/ and extra/")
            if tensor.is_sparse:
                raise ConfigurationError(f"state_dict entry {name!r} is sparse; only dense tensors can be sent")
            dtype_name(tensor.dtype)
            self.model[name] = tensor
        self.aggregator = aggregator
        self.optimizer = optimizer
        self.params: Dict[str, torch.Tensor] = {}
        state_keys: tuple = ()
        upload_keys: tuple = ()
        if aggregator is not None:
            names = [self._name_of(index, p) for index, p in enumerate(aggregator.params)]
            aggregator.bind(names)
            self.params = dict(zip(names, aggregator.params))
            state_keys, upload_keys = tuple(aggregator.state_keys), tuple(aggregator.upload_keys)
        if state_keys and optimizer is None:
            raise ConfigurationError(
                f"the aggregator exchanges optimizer state {state_keys} but no optimizer was given; "
                "pass it to set_aggregator_and_optimizer"
            )
        if optimizer is not None:
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [n for n, p in self.params.items() if id(p) not in owned]
            if state_keys and missing:
                raise ConfigurationError(
                    f"optimizer state {state_keys} is exchanged but the optimizer does not own "
                    f"parameters {missing[:3]}; build the optimizer over the same parameters"
                )
        self.optim_names = [(key, n, f"{OPTIM}/{key}/{n}") for key in state_keys for n in self.params]
        self.extra_names = [f"{EXTRA}/{key}/{n}" for key in upload_keys for n in self.params]
        down_extras, up_extras = _extra_layout(aggregator, self.extra_names)
        self.extra_names += list(up_extras)
        #: Named extras the backend serves beside the model (``aggregator.extra_layout()``).
        self.down_extra_names = list(down_extras)
        model_specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in self.model.items()]
        optim_specs = [TensorSpec(w, self.params[n].dtype, tuple(self.params[n].shape)) for _, n, w in self.optim_names]
        extra_specs = [
            TensorSpec(f"{EXTRA}/{key}/{n}", p.dtype, tuple(p.shape)) for key in upload_keys for n, p in self.params.items()
        ]
        down_specs = [TensorSpec(name, dtype, shape) for name, (dtype, shape) in down_extras.items()]
        up_specs = [TensorSpec(name, dtype, shape) for name, (dtype, shape) in up_extras.items()]
        self.download_schema = Schema(model_specs + optim_specs + down_specs)
        self.upload_schema = Schema(model_specs + optim_specs + extra_specs + up_specs)

    def _name_of(self, index: int, param: torch.Tensor) -> str:
        for name, tensor in self.model.items():
            if _same_tensor(tensor, param):
                return name
        raise ConfigurationError(
            f"parameter {index} of the aggregator ({tuple(param.shape)}) is not in the state_dict given to "
            "set_state_dict; build the aggregator from the same model's parameters"
        )

    def initial_optim_state(self) -> Dict[str, torch.Tensor]:
        """Zeros for every exchanged optimizer-state entry: what the backend serves at first."""
        return {wire: torch.zeros_like(self.params[n].detach()) for _, n, wire in self.optim_names}

    def download_tensors(self, optim_state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Backend: the tensors of the global model to encode for downloads."""
        tensors = dict(self.model)
        tensors.update(optim_state)
        if self.down_extra_names:
            tensors.update(self.aggregator.download_extras())
        return tensors

    def upload_tensors(self) -> Dict[str, torch.Tensor]:
        """Frontend: the local model, optimizer state (zeros where none yet) and aggregator extras."""
        tensors = dict(self.model)
        for key, name, wire in self.optim_names:
            value = self.optimizer.state.get(self.params[name], {}).get(key)
            tensors[wire] = torch.zeros_like(self.params[name].detach()) if value is None else value
        if self.extra_names:
            extras = self.aggregator.frontend_extras()
            unknown = sorted(set(extras) - set(self.extra_names))
            if unknown:
                raise ConfigurationError(f"aggregator produced unknown extras {unknown[:3]}")
            missing = [name for name in self.extra_names if name not in extras]
            if missing:
                raise ConfigurationError(
                    f"the upload lacks the extras {missing[:3]} that {type(self.aggregator).__name__} declares; "
                    "stage them before api.upload() (each client-side helper says how)")
            tensors.update(extras)
        return tensors

    def apply(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Frontend: copy a validated download into the model's tensors and the optimizer, in place."""
        copy_all_(self.model.values(), [tensors[name] for name in self.model])
        with torch.no_grad():
            for key, name, wire in self.optim_names:
                state = self.optimizer.state[self.params[name]]
                if isinstance(state.get(key), torch.Tensor):
                    state[key].copy_(tensors[wire])
                else:
                    state[key] = tensors[wire].clone()
        if self.down_extra_names:
            self.aggregator.receive_extras({name: tensors[name] for name in self.down_extra_names})

    def model_names(self) -> List[str]:
        """The state_dict keys, in order."""
        return list(self.model)


def _extra_layout(aggregator: Any, taken: Sequence[str]) -> tuple:
    """The named extras ``aggregator.extra_layout()`` declares: ``(download, upload)``, each a dict
    ``"extra/<name>" -> (dtype, shape)``; two empty dicts for an aggregator without the method.

    Raises:
        ConfigurationError: the layout is malformed, or a name is used twice.
    """
    layout = getattr(aggregator, "extra_layout", None)
    if not callable(layout):
        return {}, {}
    declared = layout()
    if not isinstance(declared, tuple) or len(declared) != 2:
        raise ConfigurationError(f"{type(aggregator).__name__}.extra_layout() must return (download, upload), "
                                 "two dicts of 'extra/<name>' -> (dtype, shape)")
    seen = set(taken)
    checked = []
    for direction, specs in zip(("download", "upload"), declared):
        clean = {}
        for name, spec in dict(specs).items():
            if not isinstance(name, str) or not name.startswith(f"{EXTRA}/") or name in seen:
                raise ConfigurationError(f"{type(aggregator).__name__}.extra_layout() declares {direction} extra "
                                         f"{name!r}; names must be distinct and start with '{EXTRA}/'")
            dtype, shape = spec
            dtype_name(dtype)
            clean[name] = (dtype, tuple(int(s) for s in shape))
            seen.add(name)
        checked.append(clean)
    return checked[0], checked[1]
