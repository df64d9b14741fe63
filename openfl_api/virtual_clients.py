"""Many virtual clients in one frontend process: one reusable model, one copy of the global model.

A frontend built with ``API(clients=ids)`` hosts those clients. :class:`VirtualClients` runs the
frontend's loop for them: after each ``download()`` it trains every client the backend selected
(``api.clients``), one after the other, on the same model object::

    api = ofl.API(frontend=args.rank > 0, clients=my_ids)
    ...
    def train(client: VirtualClient) -> int:
        x, y = datasets[client.id]
        for batch in torch.randperm(len(y), generator=client.generator).split(32):
            opt.zero_grad()
            F.cross_entropy(net(x[batch]), y[batch]).backward()
            opt.step()
        return len(y)                        # num_samples, FedAvg's weight

    with api:
        api.run()                            # backend: serve; frontend: returns at once
        VirtualClients(api, net, train, optimizer=opt, seed=0).run()
    api.finish()

Before each client the model is reset to the downloaded global model (kept once, whatever the
number of clients), the optimizer's state is cleared or restored from a :class:`ClientStates`
store, and the client gets a ``torch.Generator`` seeded from ``(seed, version, client id)``.
Nothing depends on which process hosts a client or which clients it trains before, so the same
clients give the same updates whether one process hosts them all or several share them.
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from openfl_api.versions import client_order
from openfl_api.errors import ConfigurationError

__all__ = ["VirtualClient", "VirtualClients", "ClientStates", "client_seed", "split_clients", "init_linear_"]

TrainResult = Union[int, Tuple[int, Mapping[str, float]]]


def client_seed(seed: int, version: int, client: Union[int, str]) -> int:
    """The seed of ``client``'s generator at ``version``: a 63-bit int that depends on nothing else.

    Integer ids (``3`` or ``"3"``) count by value, other ids by their SHA-256 (Python's ``hash`` of
    a str changes from process to process).
    """
    text = str(client)
    if text.isascii() and text.isdigit():
        words = [0, *divmod(int(text), 2 ** 32)]
    else:
        words = [1, *np.frombuffer(hashlib.sha256(text.encode("utf-8")).digest(), dtype=np.uint32).tolist()]
    state = np.random.SeedSequence([int(seed), int(version), *words]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def init_linear_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Initialise every ``torch.nn.Linear`` in ``module`` as its ``reset_parameters`` does, but
    from a generator seeded with ``seed``, and return ``module``.

    Simulated ranks are threads of one process and share torch's global generator, so a model
    built with ``torch.manual_seed`` would depend on thread timing; this does not.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                if layer.bias is not None:
                    bound = 1 / math.sqrt(layer.in_features) if layer.in_features > 0 else 0
                    torch.nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return module


def split_clients(clients: Any, parts: int, index: int) -> list:
    """The clients of frontend ``index`` (0-based) of ``parts``: every ``parts``-th id, so that the
    frontends' share of every sampled version stays about even."""
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ConfigurationError(f"split_clients(parts=...) must be an int >= 1, got {parts!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < parts:
        raise ConfigurationError(f"split_clients(index=...) must be an int in [0, {parts}), got {index!r}")
    return list(clients)[index::parts]


@dataclass
class VirtualClient:
    """What the user's train function is given for one client and one version.

    Attributes:
        id: the client id, as the API names it (a str; ``int(client.id)`` for integer ids).
        version: the version of the global model this client trains from.
        generator: a CPU ``torch.Generator`` seeded by :func:`client_seed`; draw every random
            number of the client's training from it (shuffles, dropout masks, augmentations).
        metrics: scalars to report with the upload; the train function may fill it.
    """

    id: str
    version: int
    generator: torch.Generator
    metrics: Dict[str, float] = field(default_factory=dict)


class ClientStates:
    """Per-client state (optimizer state, control variates, ...) keyed by client id, on disk.

    Each client's state is one file ``<directory>/<id>.pt`` written with ``torch.save`` and read
    with ``torch.load(weights_only=True)``; only the ``cache`` most recently used states stay in
    memory, so memory does not grow with the number of clients.

    Args:
        directory: where the files go; None: a temporary directory removed with the store.
        cache: how many states to keep in memory, >= 0.
    """

    def __init__(self, directory: Union[str, Path, None] = None, cache: int = 8) -> None:
        if isinstance(cache, bool) or not isinstance(cache, int) or cache < 0:
            raise ConfigurationError(f"ClientStates(cache=...) must be an int >= 0, got {cache!r}")
        self._temporary = tempfile.TemporaryDirectory(prefix="openfl-states-") if directory is None else None
        self.directory = Path(self._temporary.name if self._temporary is not None else directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.cache = cache
        self._cached: "collections.OrderedDict[str, Dict[str, Any]]" = collections.OrderedDict()

    def path(self, client: Union[int, str]) -> Path:
        """The file of ``client``'s state."""
        text = str(client)
        safe = text if re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", text) and not text.startswith(".") \
            else "x" + text.encode("utf-8").hex()
        return self.directory / f"{safe}.pt"

    def __contains__(self, client: object) -> bool:
        return str(client) in self._cached or self.path(str(client)).exists()

    def get(self, client: Union[int, str], default: Any = None) -> Any:
        """``client``'s state (a copy the caller may change), or ``default`` when none was saved."""
        key = str(client)
        if key in self._cached:
            self._cached.move_to_end(key)
            return _clone(self._cached[key])
        path = self.path(key)
        if not path.exists():
            return default
        state = torch.load(path, weights_only=True)
        self._remember(key, _clone(state))
        return state

    def __setitem__(self, client: Union[int, str], state: Dict[str, Any]) -> None:
        """Save ``client``'s state (written to its file at once, atomically)."""
        key = str(client)
        path = self.path(key)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(state, temporary)
        os.replace(temporary, path)
        # A copy: optimizer.state_dict() hands out the live tensors, which the next step changes.
        self._remember(key, _clone(state))

    def __getitem__(self, client: Union[int, str]) -> Any:
        state = self.get(client, _MISSING)
        if state is _MISSING:
            raise KeyError(client)
        return state

    def _remember(self, key: str, state: Any) -> None:
        if self.cache == 0:
            return
        self._cached[key] = state
        self._cached.move_to_end(key)
        while len(self._cached) > self.cache:
            self._cached.popitem(last=False)

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob("*.pt"))

    def __repr__(self) -> str:
        return f"ClientStates(directory={str(self.directory)!r}, cache={self.cache})"


_MISSING = object()
_ATTACK_SALT = 0x5EED_A77AC  # separates an attack's random stream from the client's training stream


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


class VirtualClients:
    """Run the frontend's loop for the virtual clients its API hosts.

    Args:
        api: a frontend (or backend: :meth:`run` then returns at once) built with ``API(clients=...)``
            whose ``set_state_dict`` named ``model``'s tensors.
        model: the one model every client trains; the API copies each download into it.
        train: ``train(client: VirtualClient)`` trains ``model`` for one client and returns its
            number of samples, or ``(num_samples, metrics)``.
        optimizer: the optimizer ``train`` steps. Its state is cleared before each client, or,
            with ``states``, restored from the client's last round and saved after it.
        states: a :class:`ClientStates` keeping each client's optimizer state between rounds.
        seed: the seed the clients' generators derive from (:func:`client_seed`).
        evaluate: ``evaluate(client: VirtualClient)`` evaluates ``model`` (the downloaded global
            model) on the client's held-out data and returns ``(num_samples, {name: number})``;
            each selected client runs it before training when the version is due for federated
            evaluation (``api.evaluate``). On the final model the clients evaluate and none trains.
        attack: for simulations: an :class:`~openfl_api.strategies.Attack` (``SignFlip``,
            ``ScaledUpdate``, ``GaussianUpdate``) that replaces the trained model of the clients it
            names before their upload; random attacks draw from a generator seeded by
            ``(seed, version, client id)`` too.
    """

    def __init__(
        self,
        api: Any,
        model: torch.nn.Module,
        train: Callable[[VirtualClient], TrainResult],
        *,
        optimizer: Optional[torch.optim.Optimizer] = None,
        states: Optional[ClientStates] = None,
        seed: int = 0,
        evaluate: Optional[Callable[[VirtualClient], Tuple[int, Mapping[str, float]]]] = None,
        attack: Any = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise ConfigurationError(f"VirtualClients(model=...) must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(train):
            raise ConfigurationError("VirtualClients(train=...) must be callable: train(client) -> num_samples")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigurationError(f"VirtualClients(optimizer=...) must be a torch.optim.Optimizer, "
                                     f"got {type(optimizer).__name__}")
        if states is not None and optimizer is None:
            raise ConfigurationError("VirtualClients(states=...) keeps optimizer state: pass optimizer=... too")
        if states is not None and not isinstance(states, ClientStates):
            raise ConfigurationError(f"VirtualClients(states=...) must be a ClientStates, got {type(states).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigurationError(f"VirtualClients(seed=...) must be an int >= 0, got {seed!r}")
        if evaluate is not None and not callable(evaluate):
            raise ConfigurationError("VirtualClients(evaluate=...) must be callable: evaluate(client) -> "
                                     "(num_samples, {name: number})")
        self.evaluate = evaluate
        if attack is not None and not (callable(getattr(attack, "targets", None)) and callable(getattr(attack, "apply_", None))):
            raise ConfigurationError(f"VirtualClients(attack=...) must be an openfl_api.strategies attack such as "
                                     f"SignFlip(clients=[0, 1]), got {type(attack).__name__}")
        self.attack = attack
        self.api, self.model, self.train = api, model, train
        self.optimizer, self.states, self.seed = optimizer, states, seed
        self._tensors = list(model.state_dict(keep_vars=True).values())
        self._global: Optional[list] = None
        self.trained = 0  # client updates uploaded so far

    def run(self) -> int:
        """Download, train the selected clients, upload each, until the federation ends.

        Returns:
            The number of client updates uploaded.
        """
        api = self.api
        while api.download():
            if not self.round():
                break
            api.update_version()
        return self.trained

    def round(self) -> bool:
        """Train and upload every selected client of the version just downloaded; False once ended.

        With ``evaluate``, each client first evaluates the global model when it is due; on the final
        model every client evaluates, none trains, and the result is False."""
        api = self.api
        final = api.config.get("final") is not None
        clients = sorted(api.clients, key=client_order)
        self._keep_global()
        for index, client in enumerate(clients):
            if index:
                self._restore_global()
            if self.evaluate is not None:
                context = VirtualClient(id=client, version=api.version,
                                        generator=torch.Generator().manual_seed(client_seed(self.seed, api.version, client)))
                if not api.evaluate(lambda: self.evaluate(context), client=client) and not final:
                    return False
            if final:
                continue
            num_samples, metrics = self.train_client(client, api.version)
            if self.attack is not None and self.attack.targets(client):
                # A generator of its own, so the attack draws the same whatever the training drew.
                generator = torch.Generator().manual_seed(client_seed(self.seed, api.version, client) ^ _ATTACK_SALT)
                self.attack.apply_(self._tensors, self._global, generator)
            if not api.upload(num_samples=num_samples, metrics=metrics, client=client):
                return False
            self.trained += 1
        return not final

    def train_client(self, client: str, version: int) -> Tuple[int, Dict[str, float]]:
        """Train ``model`` (already holding the global model) for one client; ``(num_samples, metrics)``."""
        generator = torch.Generator().manual_seed(client_seed(self.seed, version, client))
        context = VirtualClient(id=client, version=version, generator=generator)
        optimizer = self.optimizer
        if optimizer is not None:
            saved = self.states.get(client) if self.states is not None else None
            if saved is None:
                optimizer.state.clear()
            else:
                optimizer.load_state_dict(saved)
        result = self.train(context)
        if isinstance(result, tuple) and len(result) == 2:
            num_samples, metrics = result[0], {**context.metrics, **dict(result[1])}
        else:
            num_samples, metrics = result, context.metrics
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ConfigurationError(
                f"the train function must return num_samples (an int >= 1) or (num_samples, metrics); "
                f"client {client} returned {result!r}"
            )
        if self.states is not None:
            self.states[client] = optimizer.state_dict()
        return num_samples, metrics

    def _keep_global(self) -> None:
        with torch.no_grad():
            if self._global is None:
                self._global = [t.detach().clone() for t in self._tensors]
            else:
                for kept, tensor in zip(self._global, self._tensors):
                    kept.copy_(tensor)

    def _restore_global(self) -> None:
        with torch.no_grad():
            for tensor, kept in zip(self._tensors, self._global):
                tensor.copy_(kept)

