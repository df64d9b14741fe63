"""openfl_api: federated learning for PyTorch with one training loop on every rank.

Rank 0 becomes the backend (aggregator), every other rank a frontend (client); they exchange
versioned state_dicts through torch.distributed pipes. See ``docs/`` and ``demo.py``.
"""

from openfl_api import aggregate, logger, parser, utils
from openfl_api.address import Address, AddressFileWatcher, dump_address_file, load_address_file
from openfl_api.api import API
from openfl_api.errors import (
    AddressError,
    AdmissionError,
    ConfigurationError,
    OpenFLError,
    PayloadError,
    RoleError,
    StepError,
    TransportError,
)
from openfl_api.step import (
    AggregateCount,
    AggregatePeriod,
    Event,
    Step,
    StepAt,
    StopAtLoop,
    StopAtVersion,
    Transfer,
)

__version__ = "0.1.0"

__all__ = [
    "API",
    "Address",
    "AddressFileWatcher",
    "load_address_file",
    "dump_address_file",
    "Step",
    "StepAt",
    "Event",
    "Transfer",
    "AggregateCount",
    "AggregatePeriod",
    "StopAtVersion",
    "StopAtLoop",
    "OpenFLError",
    "ConfigurationError",
    "AddressError",
    "RoleError",
    "PayloadError",
    "AdmissionError",
    "TransportError",
    "StepError",
    "aggregate",
    "logger",
    "parser",
    "utils",
    "__version__",
]
