"""Exceptions raised by openfl_api.

Every exception subclasses :class:`OpenFLError` and the closest builtin, so callers can catch
either. Messages say what must hold, what came, and how to fix it::

    OpenFLError
     +-- ConfigurationError (ValueError)      bad argument, address or address file
     |    +-- AddressError                    an address or address-file entry is invalid
     +-- RoleError (RuntimeError)             a method was called on the wrong role or too early
     +-- PayloadError (ValueError)            a payload failed validation; nothing was applied
     +-- AdmissionError (PermissionError)     a peer was refused (wrong token, duplicate rank, ...)
     +-- TransportError (ConnectionError)     a pipe or store failed (peer crashed, timed out, ...)
     |    +-- ProtocolError                   the peer sent a message that breaks the wire protocol
     |         +-- WireError                  a message of the protected wire was refused (tampered, replayed)
     +-- StepError (RuntimeError)             a step raised; the original exception is chained
"""

from __future__ import annotations

__all__ = [
    "OpenFLError",
    "ConfigurationError",
    "AddressError",
    "RoleError",
    "PayloadError",
    "AdmissionError",
    "TransportError",
    "ProtocolError",
    "WireError",
    "StepError",
]


class OpenFLError(Exception):
    """Base class of every openfl_api error."""


class ConfigurationError(OpenFLError, ValueError):
    """An argument or a configuration value is invalid."""


class AddressError(ConfigurationError):
    """An address or an address-file entry is invalid."""


class RoleError(OpenFLError, RuntimeError):
    """A method was called on the wrong role (backend/frontend) or before its prerequisites."""


class PayloadError(OpenFLError, ValueError):
    """A payload does not match what the receiver expects; nothing of it was applied."""


class AdmissionError(OpenFLError, PermissionError):
    """A peer was refused admission (wrong token, duplicate rank, rank out of range)."""


class TransportError(OpenFLError, ConnectionError):
    """A pipe or a store failed: the peer crashed, closed the connection, or timed out."""


class ProtocolError(TransportError):
    """The peer sent a frame that breaks the wire protocol (bad magic, kind or size); the pipe is closed."""


class WireError(ProtocolError):
    """A message of the protected wire was refused: it failed authentication (a changed byte, a
    peer with another key), came again (a replay) or out of order. ``reason`` names which."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class StepError(OpenFLError, RuntimeError):
    """A step raised; the serve loop stopped. The step's exception is chained as ``__cause__``."""

    def __init__(self, step_name: str, event: str, message: str) -> None:
        super().__init__(f"step {step_name!r} raised at {event}: {message}")
        self.step_name = step_name
        self.event = event
