"""The backend's serve loop: one loop that owns the model, the version, the steps and the aggregator.

Turns of the loop run one at a time under the loop's lock: the loop's own thread runs a turn per
event it is posted (a frontend joined or left, the address file changed) and per ``tick`` when
idle; a pipe's thread runs a turn for each request it receives (:meth:`Server.handle_now`), so a
request costs no thread switch. A turn handles its event, fires ``at_loop``, offers held
downloads again and, every ``status`` interval while a version stays open, logs what the version
has and what it waits for. Checkpoints that steps ask for are written as soon as every step has
seen the event at hand, before the turn goes on (so no download of a version is served before
its checkpoint is on disk).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch

from openfl_api.address import Address
from openfl_api.asynchronous import Asynchronous
from openfl_api.backend.addresses import Addresses
from openfl_api.backend.checkpoints import Checkpoints
from openfl_api.backend.closing import Closing
from openfl_api.backend.members import Members
from openfl_api.backend.exchange import Exchange
from openfl_api.backend.model import GlobalModel
from openfl_api.backend.reports import take_report
from openfl_api.backend.status import Reporter
from openfl_api.backend.worker import AddressChange, Joined, Left, Request, Worker, end_message
from openfl_api.errors import ConfigurationError
from openfl_api.ledger import Ledger
from openfl_api.payload import MAX_HEADER_BYTES
from openfl_api.state import SharedState
from openfl_api.step import Event
from openfl_api.timeouts import Timeouts
from openfl_api.timing import RoundClock
from openfl_api.transport.base import REQUESTS, Kind, Limits
from openfl_api.transport.heartbeat import Pinger
from openfl_api.transport.rendezvous import Peer
from openfl_api.versions import client_order

__all__ = ["Server"]


class Server(Checkpoints, Closing):
    """The backend of one API: addresses, pipes, versions, aggregation and the serve loop.

    Args:
        fire: ``fire(event, *args)`` runs the API's steps for an event.
        timeouts: every wait.
        token: the admission token.
        nick_name: the backend's name.
        log: a bound logger.
        asynchronous: the asynchronous settings, or None for synchronous mode.
        needs: ``needs()`` returns ``(uploads, step name)`` for the uploads the attached steps need
            to aggregate the current version, or None; used by the status line.
        protect_wire: whether the pipes' messages are sealed; None: unless an address stays on
            this machine (:mod:`openfl_api.transport.wire`).
    """

    def __init__(
        self, fire: Callable[..., None], timeouts: Timeouts, token: bytes, nick_name: str, log: Any,
        asynchronous: Optional[Asynchronous] = None, needs: Callable[[], Optional[Tuple[int, str]]] = lambda: None,
        protect_wire: Optional[bool] = None,
    ) -> None:
        self._fire_steps = fire
        self.asynchronous = asynchronous
        self.protect_wire = protect_wire
        self.timeouts = timeouts
        self.nick_name = nick_name
        self.log = log
        self.ledger = Ledger()
        self.loop_count = 0
        self.stop_reason: Optional[str] = None
        self.ended = False
        self.request_limits = Limits(REQUESTS, MAX_HEADER_BYTES, 0)
        self.prepared = threading.Event()
        self.pinger = Pinger(timeouts.heartbeat)
        self.members = Members(self, token)
        self.exchange = Exchange(self)
        self._events: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        # Held while a turn runs, by the loop's thread or by a pipe's thread (handle_now).
        self._loop_lock = threading.RLock()
        self._failure: Optional[BaseException] = None  # raised in handle_now, re-raised by the loop
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._loop_thread: Optional[threading.Thread] = None  # the thread run() serves on
        self._thread_failure: Optional[BaseException] = None
        self._firing = 0  # depth of step events being fired
        self._aggregate_asked = False
        self._pending_checkpoints: List[Tuple[str, Callable[[], Dict[str, Any]]]] = []
        self.reporter = Reporter(self, needs)
        self.clock = RoundClock()  # each version's time split (waiting, receiving, aggregating)

    # ----------------------------------------------------------------- what steps and the API read
    @property
    def version(self) -> int:
        return self.exchange.versions.version

    @property
    def accepted(self) -> int:
        return self.exchange.versions.accepted

    @property
    def model(self) -> Optional[GlobalModel]:
        return self.exchange.model

    @property
    def frontends(self) -> List[Peer]:
        """The frontends connected now."""
        return [w.peer for w in self.workers.values()]

    @property
    def clients(self) -> List[str]:
        """The client ids of the connected frontends, in natural order (``"2"`` before ``"10"``)."""
        return sorted(self.exchange.clients, key=client_order)

    @property
    def expected(self) -> Optional[List[str]]:
        """The clients whose uploads the current version expects (declared by a sampling step), or None."""
        return self.exchange.accumulation.expected(self.version)

    def expect(self, clients: List[str]) -> None:
        """Declare the clients taking part in the current version (a sampling step does); the
        status line and quorums count them."""
        self.exchange.expect(clients)

    # ----------------------------------------------------------------- addresses and joins
    def serve(self, address: Address) -> None:
        """Host or open the store of ``address`` and start admitting frontends there."""
        self.members.serve(address)

    def watch(self, path: str) -> None:
        """Serve every address in the file ``path`` and follow its changes while running."""
        self.members.watch(path)

    @property
    def workers(self) -> Dict[int, Worker]:
        return self.members.workers

    @property
    def addresses(self) -> Addresses:
        return self.members.addresses

    def post(self, event: Any, force: bool = False) -> bool:
        """Queue an event for the loop; after the loop ended only forced events are queued."""
        with self._lock:
            if self.ended and not force:
                return False
            self._events.put(event)
            return True

    def start_frontends(self) -> int:
        """Asynchronous mode: the frontends to wait for before serving the first model."""
        wanted = self.asynchronous.min_frontends if self.asynchronous is not None else None
        if wanted is not None:
            return wanted
        return sum(len(ranks) for ranks in self.addresses.frontend_ranks.values())

    # ----------------------------------------------------------------- the model
    def prepare(self, state: SharedState, server_optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Take the shared state to serve; called before the loop runs."""
        model = GlobalModel(state, server_optimizer, self.nick_name)
        self.exchange.model = model
        self.exchange.accumulation.aggregator = state.aggregator
        self.request_limits = Limits(REQUESTS, MAX_HEADER_BYTES, state.upload_schema.nbytes)
        self.prepared.set()

    def fire(self, event: Event, *args: Any) -> None:
        """Fire the steps of ``event``; then honour an aggregation a step asked for meanwhile, and
        write the checkpoints asked for, before anything else happens (no download of a new version
        is served before its checkpoint is on disk)."""
        self._firing += 1
        try:
            self._fire_steps(event, *args)
        finally:
            self._firing -= 1
        while self._firing == 0 and self._aggregate_asked and self._aggregates_here():
            self._aggregate_asked = False
            self.exchange.aggregate()
        if self._firing == 0:
            self._write_pending_checkpoints()

    def aggregate(self) -> bool:
        """Fold the accepted uploads into a new version; False if none was accepted.

        Asked from a step, the aggregation happens once every step has seen the event at hand, so
        the order in which steps were attached never reorders events. An aggregator whose
        ``on_loop_thread`` is True (its aggregation waits long: an edge's waits for its parent)
        is aggregated on the serve loop's own thread only: asked on a pipe's thread, the
        aggregation happens at the loop's next turn, which is woken at once, and that pipe goes on
        answering its frontend's heartbeats meanwhile. Returns whether uploads are accepted then.
        """
        with self._loop_lock:
            here = self._aggregates_here()
            if self._firing or not here:
                self._aggregate_asked = True
                if not here:
                    self._events.put(None)  # a turn on the loop's thread, now rather than at the next tick
                return self.accepted > 0
            return self.exchange.aggregate()

    def _aggregates_here(self) -> bool:
        aggregator = self.exchange.model.aggregator if self.exchange.model is not None else None
        return not getattr(aggregator, "on_loop_thread", False) or threading.current_thread() is self._loop_thread

    def adopt(self, values: Mapping[str, torch.Tensor], reason: str) -> None:
        """Start the next version with ``values`` as its model, without aggregating.

        The uploads accepted for the current version are dropped, with the aggregator's sum of
        them; steps then see ``after_aggregate`` as after an aggregation (checkpoints are written,
        held downloads are served the new version). A resumed edge whose parent has moved past
        the version the edge served adopts the parent's model this way.

        Args:
            values: a tensor for every entry of the served state_dict, copied in.
            reason: where the model comes from, for the log line.
        """
        with self._loop_lock:
            exchange = self.exchange
            exchange.accumulation.settle()
            dropped = exchange.versions.accepted
            exchange.model.aggregator.reset()
            exchange.model.replace(values)
            exchange.versions.advance()
            exchange.epoch += 1
            now = time.perf_counter()
            self.clock.aggregated(now, now)
            note = f"; {dropped} accepted uploads dropped" if dropped else ""
            self.log.info(f"version {self.version}: adopted {reason}{note}")
            self.fire(Event.AFTER_AGGREGATE)

    def stop(self, reason: str) -> None:
        """Ask the loop to stop after the event at hand."""
        if self.stop_reason is None:
            self.stop_reason = reason

    # ----------------------------------------------------------------- the loop
    def run(self, before_serving: Optional[Callable[["Server"], None]] = None) -> None:
        """Serve until a step calls ``stop``; then answer every request with END.

        Args:
            before_serving: called with this server once, under the loop's lock, before the
                loop's first turn: no request is handled and no download served before it returns.
        """
        if self.exchange.model is None:
            raise ConfigurationError("call set_state_dict(...) and set_aggregator_and_optimizer(...) before run()")
        self._loop_thread = threading.current_thread()
        tick = self.timeouts.tick.total_seconds()
        try:
            if before_serving is not None:
                with self._loop_lock:
                    before_serving(self)
            self.log.info(f"serve loop started at version {self.version}")
            self.clock.start()
            while self.stop_reason is None:
                try:
                    event = self._events.get(timeout=tick)
                except queue.Empty:
                    event = None
                with self._loop_lock:
                    self._reraise()
                    self._turn(event)
            with self._loop_lock:
                self._reraise()
                self.exchange.accumulation.settle()
        except BaseException as exc:
            self.stop("interrupted (KeyboardInterrupt)" if isinstance(exc, KeyboardInterrupt)
                      else f"{type(exc).__name__} in the serve loop: {exc}")  # kept if a step stopped it first
            raise
        finally:
            with self._loop_lock:
                self._end()

    def _turn(self, event: Any) -> None:
        if event is not None:
            self._handle(event)
        self.loop_count += 1
        if self.stop_reason is None:
            self.fire(Event.AT_LOOP)
        if self.stop_reason is None:
            self.exchange.release_waiting()
        self.reporter.tick()

    def handle_now(self, event: Request) -> bool:
        """Handle a request on the calling thread (the pipe's), as a turn of the loop, one turn at a
        time with it. False, with nothing done, once the loop is stopping.

        What a turn raises goes to the loop, which stops and raises it from ``run()``; the
        frontend is told the federation ended.
        """
        with self._loop_lock:
            if self.ended or self.stop_reason is not None or event.worker.closing:
                return False
            upload = event.message.kind is Kind.UPLOAD
            started = (event.worker.receive_started or time.perf_counter()) if upload else 0.0
            try:
                # The loop thread's torch modes, whatever the calling thread has set.
                with torch.inference_mode(False), torch.enable_grad():
                    self._turn(event)
                if upload:
                    self.clock.receiving(started, time.perf_counter())
            except BaseException as exc:  # handed to the loop: run() raises it
                self._failure = exc
                self.stop(f"{type(exc).__name__} while handling a request of {event.worker.label}: {exc}")
                event.worker.reply(end_message(self.stop_reason))
            finally:
                if self.stop_reason is not None:
                    self._events.put(None)  # wake the loop: it ends the federation
            return True

    def _reraise(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def _handle(self, event: Any) -> None:
        exchange = self.exchange
        if not (isinstance(event, Request) and event.message.kind in (Kind.DOWNLOAD, Kind.REPORT)):
            exchange.accumulation.settle()  # only downloads and reports may overlap the accumulation of an upload
        if isinstance(event, Request):
            if event.message.kind is Kind.DOWNLOAD:
                exchange.download(event.worker, event.message)
            elif event.message.kind is Kind.REPORT:
                take_report(exchange, event.worker, event.message)
            else:
                exchange.upload(event.worker, event.message)
        elif isinstance(event, Joined):
            self.members.joined(event.worker)
        elif isinstance(event, Left):
            self.members.left(event.worker, event.reason)
        elif isinstance(event, AddressChange):
            self.members.change(event)

    def start(self, before_serving: Optional[Callable[["Server"], None]] = None) -> None:
        """Run the serve loop on a thread of its own (``before_serving`` as in :meth:`run`);
        :meth:`finish` waits for it."""

        def serve() -> None:
            try:
                self.run(before_serving)
            except BaseException as exc:  # returned by finish()
                self._thread_failure = exc

        self._thread = threading.Thread(target=serve, name="openfl-serve-loop", daemon=True)
        self._thread.start()
