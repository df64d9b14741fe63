"""Client-level differential privacy for FedAvg (McMahan et al., 2018, "Learning Differentially
Private Recurrent Language Models").

- :class:`Clip`: each frontend scales its update to an L2 norm of at most ``max_norm`` (C),
  over all floating entries together.
- :class:`AdaptiveClip`: the bound follows a quantile of the update norms (Andrew et al., 2021):
  each frontend reports whether its update was within the bound, and the backend moves the bound
  geometrically, ``C <- C * exp(-learning_rate * (noisy share within - target_quantile))``.
- :class:`GaussianNoise`: the backend adds ``N(0, (z C / m)**2)`` to every floating coordinate of
  the averaged update, ``z`` the noise multiplier and ``m`` the clients per version. The privacy
  spent is computed by Opacus's accountant (RDP by default; the sampled Gaussian mechanism with
  sampling rate ``q`` and multiplier ``z``, one step per noisy version) and logged per version.
- :class:`StopAtEpsilon`: a backend step that stops the federation before the next version would
  spend more than a budget.
"""

from __future__ import annotations

import math
import secrets
from typing import Any, Dict, List, Optional, Tuple

import torch

from openfl_api.errors import ConfigurationError
from openfl_api.step import BACKEND, Step
from openfl_api.transforms.base import Stage, Transform, check_int, check_number

__all__ = ["Clip", "AdaptiveClip", "GaussianNoise", "StopAtEpsilon", "ACCOUNTANTS"]

ACCOUNTANTS = ("rdp", "prv")


def _opacus_accountant(kind: str) -> Any:
    try:
        from opacus.accountants import PRVAccountant, RDPAccountant
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigurationError(
            "GaussianNoise computes the privacy spent with Opacus's accountant: pip install 'openfl_api[privacy]' "
            "(or pip install opacus)"
        ) from None
    return RDPAccountant() if kind == "rdp" else PRVAccountant()


class Clip(Transform):
    """Scale each update (all floating entries together) to an L2 norm of at most ``max_norm``.

    An update within the bound is sent unchanged, bit for bit.

    Args:
        max_norm: the bound C, > 0.
    """

    stage = Stage.CLIP
    adaptive = False

    def __init__(self, max_norm: float) -> None:
        self.max_norm = check_number("Clip", "max_norm", max_norm, 0.0, low_open=True)

    def config(self) -> Dict[str, Any]:
        return {"max_norm": self.max_norm}

    def initial_bound(self) -> float:
        return self.max_norm


class AdaptiveClip(Transform):
    """A clip bound that follows the ``target_quantile`` of the update norms (Andrew et al., 2021).

    Each frontend clips to the bound served with the model and sends one bit, whether its update
    was within it. After each version the backend sets
    ``C <- C * exp(-learning_rate * (b - target_quantile))`` with ``b`` the share of uploads within
    the bound plus ``N(0, count_noise**2)`` noise on their count, clamped to ``[0, 1]``.

    Args:
        initial: the first bound, > 0 (the paper's default 0.1).
        target_quantile: the share of updates that should fall within the bound, in ``[0, 1]``.
        learning_rate: the step of the geometric update, > 0 (0.2).
        count_noise: the standard deviation of the noise on the count of bits; None: ``m / 20``
            with ``m`` the clients per version (the paper's default) when a :class:`GaussianNoise`
            with a noise multiplier above 0 follows, else 0. With noise, the noise on the update
            is raised so that both queries together keep the noise multiplier ``z``:
            ``z_update = (z**-2 - (2 * count_noise)**-2) ** -0.5``, which needs ``z < 2 * count_noise``.
    """

    stage = Stage.CLIP
    adaptive = True

    def __init__(self, initial: float = 0.1, target_quantile: float = 0.5, learning_rate: float = 0.2,
                 count_noise: Optional[float] = None) -> None:
        self.initial = check_number("AdaptiveClip", "initial", initial, 0.0, low_open=True)
        self.target_quantile = check_number("AdaptiveClip", "target_quantile", target_quantile, 0.0, 1.0)
        self.learning_rate = check_number("AdaptiveClip", "learning_rate", learning_rate, 0.0, low_open=True)
        self.count_noise = None if count_noise is None else check_number("AdaptiveClip", "count_noise", count_noise, 0.0)

    def config(self) -> Dict[str, Any]:
        return {"initial": self.initial, "target_quantile": self.target_quantile,
                "learning_rate": self.learning_rate, "count_noise": self.count_noise}

    def initial_bound(self) -> float:
        return self.initial

    def next_bound(self, bound: float, within: float, clients: float, noise_std: float,
                   generator: torch.Generator) -> Tuple[float, float]:
        """The bound after a version in which ``within`` of ``clients`` uploads were within
        ``bound``; returns ``(new bound, noisy share)``."""
        noisy = within + (float(torch.randn((), generator=generator, dtype=torch.float64)) * noise_std if noise_std else 0.0)
        share = min(max(noisy / clients, 0.0), 1.0)
        return bound * math.exp(-self.learning_rate * (share - self.target_quantile)), share


class GaussianNoise(Transform):
    """Gaussian noise on the aggregate, scaled to the clip bound, with the privacy spent accounted.

    The backend adds ``N(0, (z * C / m)**2)`` to every floating coordinate of the new global model
    (the averaged update; any server optimizer and asynchronous mixing come after, as
    post-processing). ``m`` is ``expected_clients`` when given (the fixed denominator of DP-FedAvg:
    the sum of clipped updates is divided by ``m`` whatever number arrived), else the number of
    uploads aggregated.

    Each noisy version is one step of the sampled Gaussian mechanism with sampling rate
    ``sample_rate`` (the probability that a client takes part in a version: 1.0 when every client
    uploads every version) and noise multiplier ``z``; the epsilon at ``delta`` is Opacus's
    accountant's answer (``opacus.accountants.RDPAccountant``, or ``PRVAccountant`` with
    ``accountant="prv"``), logged after each version.

    Args:
        noise_multiplier: z, >= 0; 0 adds nothing (epsilon is then infinite).
        delta: the delta of the reported (epsilon, delta), in ``(0, 1)``.
        sample_rate: q, in ``(0, 1]``.
        expected_clients: m, clients per version, >= 1; None divides by the uploads that came.
        accountant: ``"rdp"`` or ``"prv"``.
        seed: seeds the noise (reproducible runs, tests); None draws a fresh seed per version.
    """

    stage = Stage.NOISE

    def __init__(self, noise_multiplier: float, delta: float = 1e-5, sample_rate: float = 1.0,
                 expected_clients: Optional[int] = None, accountant: str = "rdp", seed: Optional[int] = None) -> None:
        self.noise_multiplier = check_number("GaussianNoise", "noise_multiplier", noise_multiplier, 0.0)
        self.delta = check_number("GaussianNoise", "delta", delta, 0.0, 1.0, low_open=True, high_open=True)
        self.sample_rate = check_number("GaussianNoise", "sample_rate", sample_rate, 0.0, 1.0, low_open=True)
        self.expected_clients = None if expected_clients is None else check_int(
            "GaussianNoise", "expected_clients", expected_clients, 1)
        if accountant not in ACCOUNTANTS:
            raise ConfigurationError(f"GaussianNoise(accountant=...) must be one of {ACCOUNTANTS}; got {accountant!r}")
        self.accountant_kind = accountant
        self.seed = None if seed is None else check_int("GaussianNoise", "seed", seed, 0)
        self._accountant: Any = _opacus_accountant(accountant) if self.noise_multiplier > 0 else None

    def config(self) -> Dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "delta": self.delta, "sample_rate": self.sample_rate,
                "expected_clients": self.expected_clients, "accountant": self.accountant_kind}

    # ------------------------------------------------------------------ accounting
    @property
    def steps(self) -> int:
        """Noisy versions accounted so far."""
        if self._accountant is None:
            return 0
        return sum(int(count) for _, _, count in self._accountant.history)

    def account(self) -> None:
        """Account one noisy version."""
        if self._accountant is not None:
            self._accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def epsilon(self, extra_steps: int = 0) -> float:
        """The epsilon spent at :attr:`delta` (``extra_steps`` more versions ahead): the
        accountant's own answer; 0 before the first version, infinite without noise."""
        if self._accountant is None:
            return math.inf  # no noise: no privacy
        history = list(self._accountant.history)
        if extra_steps:
            history.append((self.noise_multiplier, self.sample_rate, extra_steps))
        if not history:
            return 0.0
        probe = _opacus_accountant(self.accountant_kind)
        probe.history = history
        return float(probe.get_epsilon(delta=self.delta))

    def state_dict(self) -> Dict[str, Any]:
        history = [] if self._accountant is None else [[float(z), float(q), int(n)] for z, q, n in self._accountant.history]
        return {"history": history}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self._accountant is not None:
            self._accountant.history = [(float(z), float(q), int(n)) for z, q, n in state["history"]]

    # ------------------------------------------------------------------ the noise
    def generator(self, version: int) -> torch.Generator:
        seed = secrets.randbits(63) if self.seed is None else (self.seed * 1_000_003 + version) % 2**63
        return torch.Generator().manual_seed(seed)


class StopAtEpsilon(Step):
    """Stop the federation before the next version would spend more than ``epsilon``.

    Needs a :class:`GaussianNoise` in the API's upload transforms; the epsilon is its accountant's.

    Args:
        epsilon: the privacy budget, > 0.
    """

    roles = frozenset({BACKEND})

    def __init__(self, epsilon: float) -> None:
        self.epsilon = check_number("StopAtEpsilon", "epsilon", epsilon, 0.0, low_open=True)

    def _noise(self, api: Any) -> GaussianNoise:
        chain = api.upload_transforms
        noise = None if chain is None else chain.noise
        if noise is None:
            raise ConfigurationError("StopAtEpsilon needs a GaussianNoise in the API's upload transforms: "
                                     "api.set_upload_transforms(Clip(...), GaussianNoise(...))")
        return noise

    def _check(self, api: Any) -> None:
        noise = self._noise(api)
        ahead = noise.epsilon(extra_steps=1)
        if ahead > self.epsilon:
            api.stop(f"privacy budget: epsilon {noise.epsilon():.4g} spent at delta {noise.delta:g}; version "
                     f"{api.version + 1} would reach {ahead:.4g} > epsilon={self.epsilon:g}")

    def at_loop(self, api: Any) -> None:
        if api.version == 0 and api.accepted == 0:
            self._check(api)

    def after_aggregate(self, api: Any) -> None:
        self._check(api)

    def __repr__(self) -> str:
        return f"StopAtEpsilon(epsilon={self.epsilon})"


def update_noise_multiplier(z: float, count_noise: float) -> float:
    """The noise multiplier of the update query that, with a count query of noise ``count_noise``
    (sensitivity 1/2), composes to ``z`` (Andrew et al., 2021, Theorem 1)."""
    if z == 0:
        return 0.0
    if not z < 2 * count_noise:
        raise ConfigurationError(
            f"AdaptiveClip(count_noise={count_noise}) with GaussianNoise(noise_multiplier={z}) is infeasible: the "
            f"noise multiplier must be below 2 * count_noise = {2 * count_noise}; raise count_noise (the paper uses "
            "m / 20 for m clients per version) or lower the noise multiplier"
        )
    return (z ** -2 - (2 * count_noise) ** -2) ** -0.5


def add_noise_(tensors: List[torch.Tensor], std: float, generator: torch.Generator) -> None:
    """Add ``N(0, std**2)`` to every element of each floating tensor, in place (drawn on the CPU
    from ``generator``, so the noise is the same whatever device a tensor is on)."""
    if std == 0:
        return
    with torch.no_grad():
        for tensor in tensors:
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * std
                tensor.add_(noise.to(device=tensor.device, dtype=tensor.dtype))
