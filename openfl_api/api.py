"""API: one object per process that becomes the backend (rank 0) or a frontend (rank > 0).

The same script runs on every rank::

    api = ofl.API(frontend=args.rank > 0)
    api.set_aggregate_triggers(ofl.AggregateCount(count=2))
    api.build_connection(address=ofl.Address(args=args))
    api.set_aggregator_and_optimizer(aggregate.AverageAggregator(net.parameters()), optimizer)
    api.set_state_dict(net.state_dict(keep_vars=True))
    with api:
        api.run()                    # backend: serve until a stop step fires; frontend: returns
        while api.download():        # backend: False at once; frontend: False once it ended
            train_one_round(net, optimizer)
            if not api.upload():
                break
            api.update_version()
    api.finish()

``api.evaluate(test)`` after ``download()`` reports the frontend's evaluation when the backend asks
for it (:mod:`openfl_api.evaluation`); ``API(record="run.jsonl")`` writes the record of the run
(:mod:`openfl_api.record`).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, List, Mapping, Optional, Sequence, Set, Union

import torch
from torch.utils.hooks import RemovableHandle

from openfl_api import checkpoint, connect, waiting
from openfl_api.address import Address
from openfl_api.asynchronous import Asynchronous
from openfl_api.backend import Server
from openfl_api.controls import Controls
from openfl_api.errors import ConfigurationError, RoleError
from openfl_api.frontend import Client
from openfl_api.logger import bind
from openfl_api.parser import environ
from openfl_api.record import Record, Recorder
from openfl_api.state import SharedState
from openfl_api.step import BACKEND, FRONTEND, Event, Step, Steps, StopAtVersion
from openfl_api.timeouts import Timeouts
from openfl_api.training import Training
from openfl_api.transport.rendezvous import token_from
from openfl_api.waiting import exits_fast_when_interrupted

__all__ = ["API"]


class API(Training, Controls):
    """The federation seen from one process: backend (aggregator) or frontend (client).

    Args:
        frontend: True for a frontend, False for the backend, None to decide by the rank of the
            address given to :meth:`build_connection` (rank 0 is the backend).
        token: the shared admission token; default ``OPENFL_API_TOKEN`` (the launcher sets one
            per run), else empty (admission then proves nothing; a warning says so).
        nick_name: a printable name for log lines; default ``"backend"`` or ``"rank<N>"``.
        timeout: how long a pipe waits for the peer's next message before dropping it.
        transfer_timeout: how long one message may take once it started.
        connect_timeout: how long a frontend waits to be admitted.
        drain: how long the backend's :meth:`finish` waits for frontends to leave.
        tick: how often an idle serve loop fires ``at_loop``.
        status_interval: how often a wait that lasts says what it waits for: the backend's open
            version (uploads in, uploads missing, who is connected), a frontend's download or join.
        heartbeat: how often each side of a pipe shows the other it is there when it has nothing
            else to send (frontend heartbeats between requests, backend pings during them).
        link_timeout: how long a pipe may hear nothing from its peer, not even a heartbeat, before
            the link counts as cut: both ends say so, the backend counts the frontend as gone and
            the frontend joins again (see ``reconnect``). At least twice ``heartbeat``.
        asynchronous: backend: an :class:`~openfl_api.Asynchronous` turns on asynchronous mode
            (``download()`` answered at once, staleness-weighted uploads); None is synchronous.
        clients: frontend: the ids of the virtual clients this process hosts (ints or str); each
            upload then names its client, ``upload(client=...)``. None: the frontend is one client.
        reconnect: frontend: how long to keep trying, with back-off, to reach a backend that
            went away without ending the federation (a restarted backend); 0 gives up at once.
        resume: backend: a checkpoint prefix (as given to ``AggregateCount(checkpoint=...)``);
            the serve loop starts from the newest complete checkpoint ``f"{resume}.{version}"``
            found, or from the start when there is none.
        protect_wire: whether every pipe's messages are authenticated and encrypted (AES-256-GCM
            with keys from the admission handshake, sequence numbers against replays; see
            :mod:`openfl_api.transport.wire`). None: on, unless an address stays on this machine
            (``memory://``, or ``tcp://`` on loopback). The backend decides for its addresses; a
            frontend with True refuses a backend that offers a plain wire.
        record: backend: the record of the run (:mod:`openfl_api.record`): a path for its JSON
            Lines file, an :class:`~openfl_api.record.Record` (file, TensorBoard, progress line,
            metric statistics), None (the launcher's ``--record``/``--tensorboard`` if given, else
            kept in memory for the report table and the progress line), or False (nothing).
    """

    def __init__(
        self,
        frontend: Optional[bool] = None,
        *,
        token: Optional[str] = None,
        nick_name: Optional[str] = None,
        timeout: timedelta = timedelta(minutes=30),
        transfer_timeout: timedelta = timedelta(minutes=5),
        connect_timeout: timedelta = timedelta(minutes=5),
        drain: timedelta = timedelta(seconds=10),
        tick: timedelta = timedelta(milliseconds=100),
        status_interval: timedelta = timedelta(seconds=10),
        heartbeat: timedelta = timedelta(seconds=1),
        link_timeout: timedelta = timedelta(seconds=3),
        asynchronous: Optional[Asynchronous] = None,
        clients: Optional[Sequence[Union[int, str]]] = None,
        reconnect: timedelta = timedelta(seconds=60),
        protect_wire: Optional[bool] = None,
        resume: Union[str, Path, None] = None,
        record: Union[str, Path, Record, bool, None] = None,
    ) -> None:
        _check_arguments(frontend, token, nick_name, asynchronous, reconnect, resume)
        if protect_wire is not None and not isinstance(protect_wire, bool):
            raise ConfigurationError(f"API(protect_wire=...) must be True, False or None, got {protect_wire!r}")
        self._protect_wire = protect_wire
        self._record = Record.resolve(record)
        if frontend is False and self._record is not None:
            self._record.check()
        self._recorder: Optional[Recorder] = None
        self._stopping: Optional[str] = None  # a stop asked while steps defer it
        self._released: Set[int] = set()  # ids of the deferring steps that released it
        self._warned_evaluate = False
        self._hosted = _check_clients(clients)
        self._asynchronous = asynchronous
        self._reconnect = reconnect
        self._resume = None if resume is None else str(resume)
        self._frontend = frontend
        self._token = token_from(token if token is not None else environ().get("OPENFL_API_TOKEN"))
        self._nick_name = nick_name
        self.timeouts = Timeouts(idle=timeout, transfer=transfer_timeout, connect=connect_timeout, drain=drain, tick=tick,
                                 heartbeat=heartbeat, link=link_timeout, status=status_interval)
        self._steps = Steps(self)
        self._rank: Optional[int] = None
        self._server: Optional[Server] = None
        self._client: Optional[Client] = None
        self._aggregator: Any = None
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._server_optimizer: Optional[torch.optim.Optimizer] = None
        self._state_dict: Optional[Mapping[str, torch.Tensor]] = None
        self._state: Optional[SharedState] = None
        self._ran = False
        self._finished = False
        self._transforms: Any = None  # the upload chain (openfl_api.transforms.Chain), or None
        self._chain_step: Any = None  # the chain's backend step (openfl_api.transforms.backend_side.ChainStep), or None
        self.log = bind("frontend" if frontend else "backend" if frontend is False else "-")

    # ----------------------------------------------------------------- identity
    @property
    def role(self) -> str:
        """``"backend"`` or ``"frontend"``."""
        if self._frontend is None:
            raise RoleError("the role is decided by build_connection(...) when API(frontend=None); call it first")
        return FRONTEND if self._frontend else BACKEND

    @property
    def rank(self) -> int:
        """This process's rank on its address (0 for the backend)."""
        if self._rank is None:
            raise RoleError("the rank is known once build_connection(...) was called")
        return self._rank

    @property
    def nick_name(self) -> str:
        """The name used in log lines and reports."""
        if self._nick_name is not None:
            return self._nick_name
        if self._rank is None:
            return "unconnected"
        return "backend" if self._rank == 0 else f"rank{self._rank}"

    # ----------------------------------------------------------------- steps
    def register_step(self, step: Step) -> RemovableHandle:
        """Attach ``step``; it fires after the steps attached before it.

        Returns:
            A handle whose ``remove()`` detaches the step.

        Raises:
            ConfigurationError: not a :class:`Step`, already attached, a handler's signature does
                not fit its event, or a public method looks like an event but is none.
        """
        return self._steps.attach(step)

    def set_aggregate_triggers(self, *steps: Step) -> List[RemovableHandle]:
        """Attach the steps that decide when to aggregate (``AggregateCount``, ``AggregatePeriod``)."""
        if not steps:
            raise ConfigurationError("set_aggregate_triggers needs at least one step, e.g. AggregateCount(count=2)")
        return [self.register_step(step) for step in steps]

    def _fire(self, event: Event, *args: Any) -> None:
        self._steps.fire(FRONTEND if self._frontend else BACKEND, event, *args)

    # ----------------------------------------------------------------- set-up
    @exits_fast_when_interrupted
    def build_connection(
        self,
        address: Union[Address, Sequence[Address], None] = None,
        address_file: Union[str, Path, None] = None,
    ) -> None:
        """Connect: the backend serves every address (and watches ``address_file``); a frontend joins one.

        Raises:
            AddressError: no address given, or one that does not fit the role.
            AdmissionError: the backend refused this frontend.
            TransportError: the store or the backend could not be reached in time.
        """
        if self._server is not None or self._client is not None:
            raise RoleError("build_connection(...) was called already on this API")
        addresses = connect.given_addresses(address, address_file)
        rank = addresses[0].rank if addresses else connect.file_rank(address_file)
        if self._frontend is None:
            self._frontend = rank > 0
        self._rank = rank if self._frontend else 0
        self.log = bind(self.role, self._rank)
        if self._frontend:
            joined = connect.frontend_address(addresses, address_file)
            self._rank = joined.rank
            self.log = bind(self.role, joined.rank)
            connect.warn_if_no_token(self._token, self.log)
            self._client = Client(self._fire, self.timeouts, self.log, clients=self._hosted, reconnect=self._reconnect,
                                  protect_wire=self._protect_wire)
            self._client.connect(joined, self._token, self.nick_name)
            return
        connect.check_backend_addresses(addresses)
        connect.warn_if_no_token(self._token, self.log)
        if self._record is not None:
            self._record.check()
        self._server = Server(self._fire, self.timeouts, self._token, self.nick_name, self.log,
                              asynchronous=self._asynchronous, needs=self._steps.uploads_needed,
                              protect_wire=self._protect_wire)
        for served in addresses:
            self._server.serve(served)
        if address_file is not None:
            self._server.watch(str(address_file))

    def set_aggregator_and_optimizer(
        self,
        aggregator: Any,
        optimizer: Optional[torch.optim.Optimizer] = None,
        *,
        server_optimizer: Optional[torch.optim.Optimizer] = None,
    ) -> None:
        """Set the aggregator (used by the backend) and the local optimizer (its state may ride along).

        Args:
            aggregator: an ``openfl_api.aggregate`` aggregator built over the model's parameters.
            optimizer: the frontend's optimizer; its state travels when the aggregator's
                ``state_keys`` ask for it. The backend does not step it.
            server_optimizer: backend only, optional: an optimizer over the global model that
                applies ``global - aggregate`` as a gradient (FedOpt). Without it the aggregate
                replaces the global model (FedAvg).
        """
        _check_aggregator(aggregator, optimizer, server_optimizer)
        self._aggregator, self._optimizer, self._server_optimizer = aggregator, optimizer, server_optimizer
        self._state = None

    def set_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Name the tensors to exchange: ``net.state_dict(keep_vars=True)``; downloads are copied into them."""
        self._state_dict = state_dict
        self._state = None

    def _shared_state(self) -> SharedState:
        if self._state is None:
            if self._state_dict is None:
                raise RoleError("call set_state_dict(net.state_dict(keep_vars=True)) before run(), download() or upload()")
            self._state = SharedState(self._state_dict, self._aggregator, self._optimizer)
        return self._state

    # ----------------------------------------------------------------- upload transforms
    # ----------------------------------------------------------------- running
    @exits_fast_when_interrupted
    def run(self, before_serving: Optional[Callable[[Server], None]] = None) -> None:
        """Backend: serve until a stop step fires (blocking). Frontend: return at once.

        Args:
            before_serving: backend: called with the :class:`~openfl_api.backend.Server` once the
                checkpoint named by ``resume=`` is loaded, under the serve loop's lock and before
                its first turn, so no download is served before it returns; it may replace the
                served model (``server.model.replace(values)``) or start the next version with a
                model of its own (``server.adopt(values, reason)``). An :class:`~openfl_api.Edge`
                puts its parent's model in place there.
        """
        if self._frontend:
            return
        self._prepare_backend(self._require_server("run()")).run(before_serving)

    @exits_fast_when_interrupted
    def start(self, before_serving: Optional[Callable[[Server], None]] = None) -> None:
        """Backend: run the serve loop in a background thread (``before_serving`` as in
        :meth:`run`); :meth:`finish` waits for it."""
        if self._frontend:
            return
        self._prepare_backend(self._require_server("start()")).start(before_serving)

    def _require_client(self, what: str) -> Client:
        if self._client is None:
            raise RoleError(f"{what} needs a connection: call build_connection(...) first")
        return self._client

    def _prepare_backend(self, server: Server) -> Server:
        if self._ran:
            raise RoleError("run() or start() was called already; a serve loop runs once")
        self._ran = True
        server.prepare(self._shared_state(), self._server_optimizer)
        if self._transforms is not None:
            from openfl_api.transforms.backend_side import attach_backend

            attach_backend(self._transforms, self, server, self._token, self._chain_step, self._steps.uploads_needed)
        if self._record is not None:
            stops = [s.max_version for s in self._steps if isinstance(s, StopAtVersion)]
            self._recorder = Recorder(self._record, server.clock, min(stops) if stops else None,
                                      synchronous=self._asynchronous is None, log=self.log)
            self.register_step(self._recorder)  # last: it records what the other steps did
        source = self._resume_checkpoint(server)
        if self._recorder is not None:
            self._recorder.start(server.version, source)
        return server

    def _resume_checkpoint(self, server: Server) -> Optional[str]:
        if self._resume is None:
            return None
        found = checkpoint.newest(self._resume, self.log)
        if found is None:
            self.log.info(f"no checkpoint {self._resume}.<version> to resume from; starting at version 0")
            return None
        source, data = found
        steps = server.load_checkpoint(data, source)
        checkpoint.load_step_states([s for s in self._steps if s is not self._recorder], steps, source, self.log)
        if self._recorder is not None and "record" in steps:
            self._recorder.load_state_dict(steps["record"])
        return source

    # ----------------------------------------------------------------- the end
    def report(self) -> str:
        """The Pending / Finished / Discard table of this API's transfers; on the backend also the
        time split and the mean of every metric per version (see :attr:`history`)."""
        owner = self._server or self._client
        if owner is None:
            return "(not connected)"
        versions = self._recorder.history.table() if self._recorder is not None else ""
        return owner.ledger.table() + (f"\n{versions}" if versions else "")

    def finish(self) -> None:
        """Close every pipe and log the transfer table. The backend first waits for its serve loop."""
        self._finish(interrupted=False)

    def _finish(self, interrupted: bool) -> None:
        if self._finished:
            return
        self._finished = True
        failure = None
        if self._server is not None:
            failure = self._server.finish(drain=not interrupted)
            if self._recorder is not None:
                self._recorder.close(self._server.version, self._server.stop_reason or "finish() was called")
        elif self._client is not None:
            self._client.finish(interrupted=interrupted)
        self.log.info(f"finished: {self.nick_name}\n{self.report()}")
        if failure is not None:
            raise failure

    def __enter__(self) -> "API":
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        if exc_type is not None and not self._finished:
            interrupted = issubclass(exc_type, KeyboardInterrupt)
            if interrupted:
                waiting.exit_fast_after_interrupt()
            self.stop("interrupted (KeyboardInterrupt)" if interrupted else f"{exc_type.__name__} in the training loop",
                      at_once=True)
            try:
                self._finish(interrupted=interrupted)
            except Exception as finish_error:
                self.log.debug(f"finish() after {exc_type.__name__} failed too: {finish_error}")

    def __repr__(self) -> str:
        role = "undecided" if self._frontend is None else self.role
        return f"API(role={role}, nick_name={self.nick_name!r}, version={self.version})"


def _check_arguments(frontend: Any, token: Any, nick_name: Any, asynchronous: Any, reconnect: Any, resume: Any) -> None:
    """Validate ``API(...)``'s arguments (timeouts are checked by :class:`Timeouts`)."""
    if frontend is not None and not isinstance(frontend, bool):
        raise ConfigurationError(f"API(frontend=...) must be True, False or None, got {frontend!r}")
    if token is not None and not isinstance(token, str):
        raise ConfigurationError(f"API(token=...) must be a str, got {type(token).__name__}")
    if nick_name is not None and (not isinstance(nick_name, str) or not 0 < len(nick_name) <= 64
                                  or not nick_name.isprintable()):
        raise ConfigurationError(f"API(nick_name=...) must be 1-64 printable characters, got {nick_name!r}")
    if asynchronous is not None and not isinstance(asynchronous, Asynchronous):
        raise ConfigurationError(
            f"API(asynchronous=...) must be an openfl_api.Asynchronous or None, got {type(asynchronous).__name__}"
        )
    if not isinstance(reconnect, timedelta) or reconnect < timedelta(0):
        raise ConfigurationError(f"API(reconnect=...) must be a datetime.timedelta >= 0, got {reconnect!r}")
    if resume is not None and (not isinstance(resume, (str, Path)) or not str(resume)):
        raise ConfigurationError(f"API(resume=...) must be a checkpoint path prefix or None, got {resume!r}")


def _check_aggregator(aggregator: Any, optimizer: Any, server_optimizer: Any) -> None:
    """Validate ``set_aggregator_and_optimizer(...)``'s arguments."""
    for name in ("params", "bind", "add", "aggregate", "state_keys", "upload_keys", "frontend_extras"):
        if not hasattr(aggregator, name):
            raise ConfigurationError(
                f"aggregator must be an openfl_api.aggregate.Aggregator, got {type(aggregator).__name__} "
                f"(it has no {name!r})"
            )
    for label, value in (("optimizer", optimizer), ("server_optimizer", server_optimizer)):
        if value is not None and not isinstance(value, torch.optim.Optimizer):
            raise ConfigurationError(f"{label} must be a torch.optim.Optimizer, got {type(value).__name__}")
    if server_optimizer is not None and getattr(aggregator, "steps_server", False):
        raise ConfigurationError(
            f"{type(aggregator).__name__} applies the updates with a server step of its own; give it its server "
            "optimizer, e.g. server=aggregate.FedAdam(lr=0.01), instead of server_optimizer=")


def _check_clients(clients: Optional[Sequence[Union[int, str]]]) -> Optional[List[str]]:
    """Validate ``API(clients=...)``: distinct ids, ints >= 0 or printable str of at most 64 characters."""
    if clients is None:
        return None
    if isinstance(clients, (str, bytes)) or not hasattr(clients, "__iter__"):
        raise ConfigurationError(f"API(clients=...) must be a sequence of client ids, e.g. range(100); got {clients!r}")
    ids: List[str] = []
    for client in clients:
        if isinstance(client, int) and not isinstance(client, bool) and client >= 0:
            ids.append(str(client))
        elif isinstance(client, str) and 0 < len(client) <= 64 and client.isprintable():
            ids.append(client)
        else:
            raise ConfigurationError(
                f"API(clients=...) holds {client!r}; client ids are ints >= 0 or printable str of 1-64 characters"
            )
    if not ids:
        raise ConfigurationError("API(clients=...) is empty; a frontend hosts at least one client")
    if len(set(ids)) != len(ids):
        raise ConfigurationError("API(clients=...) holds the same client id twice; ids must be distinct")
    return ids
