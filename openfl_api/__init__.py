"""openfl_api: federated learning for PyTorch with one training loop on every rank.

Rank 0 becomes the backend (aggregator), every other rank a frontend (client); they exchange
versioned state_dicts through torch.distributed pipes. See ``docs/`` and ``demo.py``.

Public names are imported on first use, so ``python -m openfl_api.launch`` starts without
importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any, List

from openfl_api.errors import (
    AddressError,
    AdmissionError,
    ConfigurationError,
    OpenFLError,
    PayloadError,
    ProtocolError,
    RoleError,
    StepError,
    TransportError,
    WireError,
)

__version__ = "0.1.0"

_LAZY = {
    "API": "openfl_api.api",
    "Address": "openfl_api.address",
    "AddressFileWatcher": "openfl_api.address",
    "load_address_file": "openfl_api.address",
    "dump_address_file": "openfl_api.address",
    "Step": "openfl_api.step",
    "StepAt": "openfl_api.step",
    "Event": "openfl_api.step",
    "Transfer": "openfl_api.step",
    "AggregateCount": "openfl_api.step",
    "AggregatePeriod": "openfl_api.step",
    "StopAtVersion": "openfl_api.step",
    "StopAtLoop": "openfl_api.step",
    "Deadline": "openfl_api.step",
    "ClientSampling": "openfl_api.step",
    "ReportSilent": "openfl_api.step",
    "Asynchronous": "openfl_api.asynchronous",
    "VirtualClients": "openfl_api.virtual_clients",
    "ClientStates": "openfl_api.virtual_clients",
    "Record": "openfl_api.record",
    "FederatedEvaluation": "openfl_api.evaluation",
    "CentralizedEvaluation": "openfl_api.evaluation",
    "MetricRules": "openfl_api.metrics",
    "StopAtEpsilon": "openfl_api.transforms.dp",
    "Edge": "openfl_api.hierarchy",
    "Topology": "openfl_api.topology",
}
_SUBMODULES = ("aggregate", "data", "logger", "parser", "virtual_clients", "utils", "transforms",
               "strategies")

__all__ = [
    *_LAZY,
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
    *_SUBMODULES,
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"openfl_api.{name}")
    else:
        raise AttributeError(f"module 'openfl_api' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
