"""Hierarchical federations: middle nodes (edges) between the root and the leaves.

An :class:`Edge` is a frontend toward its parent and a backend toward its children. Its children
see an ordinary backend (versions, steps, discards, checkpoints); when the edge's steps aggregate
(``AggregateCount(2)``: every two uploads), it uploads its children's *exact* weighted sum to the
parent (:mod:`openfl_api.aggregate.partial`), waits for the parent's next model and serves that as
its own next version. The root merges the partial sums in integers, so a federation of any depth
gives the same weights, bit for bit, as the flat federation of the same leaves.

A :class:`Topology` says who is whose parent; every rank of one launch reads it to learn its role
and its addresses, so ``python -m openfl_api.launch`` (or ``simulate``) starts every node of the
tree from one script.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch

from openfl_api.address import Address
from openfl_api.aggregate.average import NaiveAggregator
from openfl_api.aggregate.base import Aggregator
from openfl_api.aggregate.partial import PartialSums
from openfl_api.api import API
from openfl_api.backend import Server
from openfl_api.errors import ConfigurationError, RoleError
from openfl_api.topology import Topology

__all__ = ["Edge", "Topology"]  # Topology is re-exported from openfl_api.topology


class _Forward:
    """The aggregator of an edge's children-facing backend: sums the children's uploads exactly
    (the wrapped aggregator's :class:`ExactSum`) and, when the edge's steps aggregate, hands that
    sum to the edge, which uploads it to the parent and returns the parent's next model."""

    steps_server = True  # the new version is the parent's model: never mixed with the edge's own
    # An aggregation waits for the parent's next model, which may take long: on a child's pipe
    # thread, the pipe would neither echo the child's heartbeats nor take its next request, and
    # the child would count the link as cut. On the loop's thread, a child's request waits for the
    # loop and the backend pings the child meanwhile.
    on_loop_thread = True

    def __init__(self, inner: Aggregator, edge: "Edge") -> None:
        self.inner, self.edge = inner, edge
        self.samples = 0
        #: The parent's version served when the checkpoint resumed from was written, or None.
        self.resumed_parent: Optional[int] = None

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "__setstate__"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def add(self, tensors: Mapping[str, torch.Tensor], num_samples: int, weight: float = 1.0,
            peak: Optional[float] = None) -> None:
        self.inner.add(tensors, num_samples, weight, peak)
        self.samples += num_samples

    def aggregate(self, current: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        inner = self.inner
        if not inner.count:
            raise ConfigurationError("an edge aggregates once at least one child's upload was added")
        segments, weights, samples = inner._sum.segments(), list(inner._weights), self.samples
        self.reset()
        return self.edge._forward(segments, weights, samples, list(inner._shapes))

    def reset(self) -> None:
        self.inner.reset()
        self.samples = 0

    def state_dict(self) -> Dict[str, Any]:
        return {"sum": self.inner.state_dict(), "samples": self.samples, "parent": self.edge.parent.version}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state["sum"])
        self.samples = int(state["samples"])
        self.resumed_parent = None if state.get("parent") is None else int(state["parent"])


class Edge:
    """A middle node: a frontend toward its parent, a backend toward its children.

    Build the two APIs as for a frontend and a backend (steps, ``asynchronous=``, ``resume=`` on
    ``children``, which aggregates with the steps attached to it), then::

        edge = ofl.Edge(parent=ofl.API(frontend=True), children=ofl.API(frontend=False))
        with ofl.StepAt(edge.children):
            ofl.AggregateCount(count=2)            # upload to the parent every 2 children's uploads
        up, down = topology.addresses(ofl.Address(args=args))
        edge.build_connection(parent=up, children=down)
        edge.set_state_dict(net.state_dict(keep_vars=True), aggregate.AverageAggregator(net.parameters()))
        edge.run()                                 # until the parent ends the federation
        edge.finish()

    The parent must aggregate with :class:`~openfl_api.aggregate.partial.PartialSums` (an edge of
    a deeper tree does so already), built with the same ``planes`` and ``pieces``.

    Args:
        parent: a frontend API (``frontend=True``) toward the parent.
        children: a backend API (``frontend=False``) toward the children.
    """

    def __init__(self, parent: API, children: API) -> None:
        if not isinstance(parent, API) or not isinstance(children, API):
            raise ConfigurationError("Edge(parent=..., children=...) takes two openfl_api.API objects")
        if parent._frontend is not True or children._frontend is not False:
            raise RoleError("an Edge needs parent=API(frontend=True) and children=API(frontend=False)")
        self.parent, self.children = parent, children
        self._children_sum: Optional[_Forward] = None
        self._up: Dict[str, torch.Tensor] = {}
        self._sums: Optional[PartialSums] = None
        self._down: Optional[Address] = None

    @property
    def log(self) -> Any:
        """The children's backend's logger (bound to its rank once connected)."""
        server = self.children._server
        return server.log if server is not None else self.children.log

    def build_connection(self, parent: Address, children: Address) -> None:
        """Join the parent at ``parent`` now; serve the children at ``children`` once :meth:`run`
        has the parent's first model (children wait to be admitted until then, within their
        ``connect_timeout``, rather than joining a serve loop that does not run yet)."""
        if not isinstance(children, Address):
            raise ConfigurationError(f"Edge.build_connection(children=...) must be an Address, got {type(children).__name__}")
        self.parent.build_connection(address=parent)
        self._down = children

    def set_state_dict(self, state_dict: Mapping[str, torch.Tensor], aggregator: Aggregator, planes: int = 4,
                       pieces: int = 8) -> None:
        """The model served to the children and the aggregator that sums their uploads.

        Args:
            state_dict: ``net.state_dict(keep_vars=True)``; each parent model is copied into it.
            aggregator: a plain aggregator over ``net.parameters()`` (how children are weighted),
                in :class:`~openfl_api.aggregate.partial.PartialSums` when children are edges
                (:meth:`Topology.aggregator` decides).
            planes, pieces: as the parent's :class:`~openfl_api.aggregate.partial.PartialSums`.
        """
        self._up = {name: t.detach().clone() for name, t in state_dict.items()}
        names = [next((n for n, t in state_dict.items() if _same(t, p)), None) for p in aggregator.params]
        if None in names:
            raise ConfigurationError("the aggregator's parameters must be tensors of state_dict; build it from "
                                     "the same model's parameters")
        self._sums = PartialSums(NaiveAggregator([self._up[n] for n in names]), self._up, planes, pieces)
        if not isinstance(aggregator, PartialSums):  # children that are edges upload partial sums already
            PartialSums(aggregator, state_dict, planes, pieces)  # the checks a partial sum of the children needs
        self.children.set_state_dict(state_dict)
        self._children_sum = _Forward(aggregator, self)
        self.children.set_aggregator_and_optimizer(self._children_sum)
        self.parent.set_state_dict(self._up)
        self.parent.set_aggregator_and_optimizer(self._sums)

    def run(self) -> None:
        """Download the parent's model, then serve the children until the parent ends the federation."""
        if self._sums is None or self._down is None:
            raise RoleError("call edge.build_connection(...) and edge.set_state_dict(state_dict, aggregator) before run()")
        if not self.parent.download():
            self.log.info(f"the parent ended the federation before the first model: {self.parent.stop_reason}")
            return
        self.children.build_connection(address=self._down)
        self.children.run(before_serving=self._serve_the_parents_model)

    def _serve_the_parents_model(self, server: Server) -> None:
        """Before any download: the parent's model wins over a resumed one. An edge resumed from a
        checkpoint written while it served the parent's version ``p`` finds the parent at ``p``
        when its sum of the version never reached the parent (a synchronous parent holds the
        download of a member whose upload it accepted until the next version); it then serves the
        same version again, and its children train again what was lost with it. Finding the parent
        past ``p``, the parent has its sum (or went on without it): the edge adopts the parent's
        model as its next version, as its aggregation would have."""
        served, now = self._children_sum.resumed_parent, self.parent.version
        if served is not None and now > served:
            server.adopt(self._up, f"the parent's version {now} (the parent is past its version {served}, which the "
                                   "resumed checkpoint served)")
        else:
            server.model.replace(self._up)
        self.log.info(f"edge: serving the parent's version {now} as version {server.version}")

    def _forward(self, segments: List[Any], weights: List[float], samples: int,
                 names: List[str]) -> Dict[str, torch.Tensor]:
        """On the children's serve loop: upload the exact sum, wait for the parent's next model."""
        self._sums.stage(segments, weights)
        ended = not self.parent.upload(num_samples=samples)
        if not ended:
            self.log.info(f"edge: sent {len(weights)} children's exact sum for the parent's version "
                          f"{self.parent.version}; waiting for its next version")
            self.parent.update_version()
            ended = not self.parent.download()
        if ended:
            self.children.stop(f"the parent ended the federation: {self.parent.stop_reason}")
        else:
            self.log.info(f"edge: uploaded {len(weights)} children's exact sum; serving the parent's version "
                          f"{self.parent.version}")
        return {name: self._up[name].detach().clone() for name in names}

    def finish(self) -> None:
        """Finish the children's side (its serve loop ended), then the parent's."""
        try:
            self.children.finish()
        finally:
            self.parent.finish()

    def __enter__(self) -> "Edge":
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        self.children.__exit__(exc_type, exc, traceback)
        self.parent.__exit__(exc_type, exc, traceback)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype)
