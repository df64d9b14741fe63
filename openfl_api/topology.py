"""Topology: who is whose parent in a hierarchical federation, and each rank's addresses.

Every rank of one launch reads the same topology (built in the script, or a topology file) to
learn its role (root, edge, leaf), the address it joins and the address it serves; see
:mod:`openfl_api.hierarchy` for the edges themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from openfl_api.address import Address
from openfl_api.aggregate.base import Aggregator
from openfl_api.aggregate.partial import PartialSums
from openfl_api.errors import ConfigurationError

__all__ = ["Topology"]


class Topology:
    """A tree of ranks: rank 0 is the root, every other rank names its parent.

    Args:
        parents: each rank but 0 mapped to its parent's rank.
        hosts: optional host name or address of a middle node's machine, for the ``tcp://``
            address it serves its children on (default: the host of the root's address).

    Raises:
        ConfigurationError: the ranks are not ``1 .. n``, or the parents do not form a tree under 0.
    """

    def __init__(self, parents: Mapping[int, int], hosts: Optional[Mapping[int, str]] = None) -> None:
        try:
            self.parents = {int(rank): int(parent) for rank, parent in parents.items()}
        except (TypeError, ValueError, AttributeError):
            raise ConfigurationError(f"Topology(parents=...) must map ranks to parent ranks (ints), got {parents!r}"[:200]) from None
        self.hosts = {int(rank): str(host) for rank, host in (hosts or {}).items()}
        if sorted(self.parents) != list(range(1, len(self.parents) + 1)):
            raise ConfigurationError(f"Topology needs a parent for each rank 1 .. n and none for rank 0, got ranks "
                                     f"{sorted(self.parents)}; rank 0 is the root")
        for rank in self.parents:
            seen, node = {rank}, self.parents[rank]
            while node != 0:
                if node not in self.parents or node in seen:
                    raise ConfigurationError(f"rank {rank}'s parents do not lead to the root (rank 0): "
                                             f"{node} is {'unknown' if node not in self.parents else 'on a loop'}")
                seen.add(node)
                node = self.parents[node]

    @classmethod
    def tree(cls, fanout: List[int]) -> "Topology":
        """A full tree: ``fanout[d]`` children per node at depth ``d``, ranks numbered level by level
        (``tree([2, 2])``: root 0, edges 1 and 2, leaves 3 and 4 under 1, 5 and 6 under 2)."""
        if not fanout or any(isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in fanout):
            raise ConfigurationError(f"Topology.tree(fanout) needs a list of ints >= 1, got {fanout!r}")
        parents: Dict[int, int] = {}
        level, rank = [0], 1
        for count in fanout:
            below = []
            for node in level:
                for _ in range(count):
                    parents[rank] = node
                    below.append(rank)
                    rank += 1
            level = below
        return cls(parents)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Topology":
        """Read a topology file: ``{"parents": {"1": 0, "2": 0, "3": 1, ...}, "hosts": {"1": "10.0.0.2"}}``."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(data["parents"], data.get("hosts"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(f"topology file {str(path)!r} must be JSON with a 'parents' object of rank -> "
                                     f"parent rank: {exc}") from None

    @property
    def world_size(self) -> int:
        """Every node of the tree: the ranks a launch must start."""
        return len(self.parents) + 1

    def children(self, rank: int) -> List[int]:
        """The ranks whose parent is ``rank``, in rank order."""
        return sorted(r for r, parent in self.parents.items() if parent == rank)

    def parent(self, rank: int) -> int:
        """The parent of ``rank`` (not the root)."""
        self.role(rank)
        if rank == 0:
            raise ConfigurationError("the root (rank 0) has no parent")
        return self.parents[rank]

    def aggregator(self, node: int, aggregator: Aggregator, state_dict: Mapping[str, torch.Tensor], planes: int = 4,
                   pieces: int = 8) -> Any:
        """The aggregator every member of the federation served by ``node`` builds: ``aggregator``,
        wrapped in :class:`~openfl_api.aggregate.partial.PartialSums` when one of those members
        is a middle node (so its uploads are exact partial sums)."""
        if any(self.children(child) for child in self.children(node)):
            return PartialSums(aggregator, state_dict, planes, pieces)
        return aggregator

    def role(self, rank: int) -> str:
        """``"root"``, ``"edge"`` (a middle node) or ``"leaf"``."""
        if rank == 0:
            return "root"
        if rank not in self.parents:
            raise ConfigurationError(f"rank {rank} is not in the topology (ranks 0 .. {len(self.parents)}); launch "
                                     f"{self.world_size} ranks for it")
        return "edge" if self.children(rank) else "leaf"

    def addresses(self, address: Address) -> Tuple[Optional[Address], Optional[Address]]:
        """``(toward the parent, toward the children)`` of ``address.rank``, either None where there
        is none: the root serves ``address`` itself; middle node ``n`` serves its children on the
        root's address with ``+ n`` added to a ``tcp://`` port (on ``hosts[n]`` if given), or
        ``.n`` added to a ``memory://`` name or ``file://`` path."""
        if address.world_size != self.world_size:
            raise ConfigurationError(f"the topology has {self.world_size} ranks but the launch has world_size "
                                     f"{address.world_size}; start {self.world_size} ranks")
        rank = address.rank
        role = self.role(rank)
        up = None
        if role != "root":
            parent = self.parents[rank]
            up = self._address(address, parent, self.children(parent).index(rank) + 1)
        down = self._address(address, rank, 0) if role != "leaf" else None
        return up, down

    def _address(self, base: Address, node: int, rank: int) -> Address:
        init_method = base.init_method
        if node:
            if init_method.startswith("tcp://"):
                host, _, port = init_method[len("tcp://"):].rpartition(":")
                init_method = f"tcp://{self.hosts.get(node, host)}:{int(port) + node}"
            else:
                init_method = f"{init_method}.{node}"
        return Address(init_method=init_method, world_size=len(self.children(node)) + 1, rank=rank,
                       group_name=base.group_name)
