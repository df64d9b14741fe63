"""Secure aggregation: the backend learns the sum of the updates of a round, not one of them.

Bonawitz et al., 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine Learning"),
with SecAgg+'s sparse neighbour graph as an option (Bell et al., 2020). Each frontend quantizes
its update to the ring of 32-bit integers and adds masks that cancel in the sum: a pairwise mask
per neighbour from X25519 key agreement, and a self mask; both masks' seeds are Shamir-shared with
the neighbours, so the backend can remove the pairwise masks of a frontend that drops after
masking (from shares of its key) and the self masks of the survivors (from shares of their
seeds), never both for one frontend.

The rounds run over the address's store (the control plane), under
``transforms/<run>/secagg/<round>/``; every value is JSON with an HMAC under the admission token.
The masked update itself travels as the upload's payload (``wire/masked``, int32). See
``docs/privacy.rst`` for the message table.

Synchronous mode: one round per version, with every client connected (or expected by
:class:`~openfl_api.ClientSampling`). Asynchronous mode: one round per buffer of ``cohort``
frontends, the first whose keys come, whatever version they trained from (FedBuff's buffer;
staleness weights the buffer through the mixing weight). A round that fails (too few valid
shares, shares or a commitment that disagree) discards its masked uploads, names its culprits,
and the next round opens at once (synchronous mode: for the same version).

The package's modules: :mod:`~openfl_api.transforms.secagg.settings` (the :class:`SecAgg`
transform and the errors), :mod:`~openfl_api.transforms.secagg.masking` (quantization, the
neighbour graph, the masks), :mod:`~openfl_api.transforms.secagg.shares` (the Shamir shares:
dealt, sealed, checked, combined), :mod:`~openfl_api.transforms.secagg.board` (signed values on the
stores), :mod:`~openfl_api.transforms.secagg.client` (a frontend's rounds) and
:mod:`~openfl_api.transforms.secagg.coordinator` (the backend's), with
:mod:`~openfl_api.transforms.secagg.recovery` (the secrets rebuilt and the masks removed at a
round's end).
"""

from openfl_api.transforms.secagg.board import Board
from openfl_api.transforms.secagg.client import SecAggClient
from openfl_api.transforms.secagg.coordinator import Coordinator
from openfl_api.transforms.secagg.masking import dequantize_sum, neighbours_of, quantize, weight_of
from openfl_api.transforms.secagg.settings import FederationEnded, SecAgg, SecAggFailure

__all__ = ["SecAgg", "Board", "SecAggClient", "Coordinator", "quantize", "dequantize_sum", "neighbours_of",
           "weight_of", "SecAggFailure", "FederationEnded"]
