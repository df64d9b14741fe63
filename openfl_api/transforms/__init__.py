"""Upload transforms: one ordered chain per API for clipping, compression, secure aggregation and noise.

Declared on every rank with ``api.set_upload_transforms(...)``::

    from openfl_api import transforms as T

    api.set_upload_transforms(T.Clip(1.0), T.SecAgg(), T.GaussianNoise(1.1, sample_rate=1.0))

The frontend applies the chain to its update (the local model minus the model it downloaded)
before upload; the backend undoes it before aggregation and adds the noise after. The chain is
checked when a frontend joins (a different one is refused with the difference named) and its
digest is in every upload's header. See ``docs/privacy.rst``.
"""

from openfl_api.transforms.base import Stage, Transform
from openfl_api.transforms.chain import RULES, Chain
from openfl_api.transforms.compress import QSGD, Cast, TopK
from openfl_api.transforms.dp import AdaptiveClip, Clip, GaussianNoise, StopAtEpsilon
from openfl_api.transforms.secagg import SecAgg, SecAggFailure

__all__ = [
    "Transform",
    "Stage",
    "Chain",
    "RULES",
    "Clip",
    "AdaptiveClip",
    "GaussianNoise",
    "StopAtEpsilon",
    "TopK",
    "QSGD",
    "Cast",
    "SecAgg",
    "SecAggFailure",
]
