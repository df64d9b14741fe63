"""Moving messages between the backend and its frontends: pipes and the rendezvous that makes them.

``base`` defines the pipe interface, ``gloo`` the real pipes (two-rank ``ProcessGroupGloo``),
``memory`` in-process pipes for tests and simulation, ``store`` the stores behind addresses, and
``rendezvous`` the store-based admission shared by both kinds of pipe.
"""

from openfl_api.transport.base import Kind, Limits, Message, Pipe
from openfl_api.transport.rendezvous import Lobby, Peer, join, token_from
from openfl_api.transport.store import open_store

__all__ = ["Kind", "Limits", "Message", "Pipe", "Lobby", "Peer", "join", "open_store", "token_from"]
