"""The calls a frontend's training loop makes: download, upload, evaluate, update_version.

:class:`Training` is the part of :class:`~openfl_api.api.API` that a training loop calls on every
rank. On the backend they return at once (``download()`` and ``upload()`` False), so the same loop
runs on every rank; on a frontend they go through its :class:`~openfl_api.frontend.Client`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

from openfl_api.errors import ConfigurationError, RoleError
from openfl_api.evaluation import check_every, run_evaluation
from openfl_api.frontend import Client, check_upload_meta
from openfl_api.state import SharedState
from openfl_api.waiting import exits_fast_when_interrupted

__all__ = ["Training"]


class Training:
    """The part of :class:`~openfl_api.api.API` a training loop calls.

    Expects ``_frontend``, ``_transforms``, ``_hosted``, ``_token``, ``_warned_evaluate``,
    ``timeouts``, ``log``, ``rank``, ``nick_name`` and the methods ``_require_client`` and
    ``_shared_state`` on the object.
    """

    _frontend: bool
    _transforms: Any
    _hosted: Any
    _token: bytes
    _warned_evaluate: bool
    timeouts: Any
    log: Any
    rank: int
    nick_name: str
    _require_client: Callable[[str], Client]
    _ran: bool
    _client: Optional[Client]
    _chain_step: Any
    register_step: Callable[..., Any]
    _shared_state: Callable[[], SharedState]

    def set_upload_transforms(self, *transforms: Any, seed: Optional[int] = None) -> Any:
        """Declare the upload chain: transforms applied to each update on the frontend before
        upload and undone on the backend before aggregation (clipping, compression, secure
        aggregation, noise; see ``docs/privacy.rst``). Call it with the same transforms on every rank,
        before ``run()``/``download()``; a frontend with another chain is refused when it joins.

        Args:
            transforms: ``openfl_api.transforms`` objects in the order clip, compress, mask, noise.
            seed: seeds the frontends' stochastic rounding per version and client; None: fresh.

        Returns:
            The :class:`~openfl_api.transforms.Chain`.

        Raises:
            ConfigurationError: a transform is unknown, out of order, or combined with one it cannot go with.
            RoleError: called twice, or after the federation started.
        """
        from openfl_api.transforms.backend_side import ChainStep
        from openfl_api.transforms.chain import Chain

        if self._transforms is not None:
            raise RoleError("set_upload_transforms(...) was called already on this API; a chain is declared once")
        if self._ran or (self._client is not None and self._client.transforms is not None):
            raise RoleError("set_upload_transforms(...) must come before run(), start(), download() and upload()")
        chain = Chain(transforms, seed=seed)
        self._transforms = chain
        self._chain_step = ChainStep()
        self.register_step(self._chain_step)
        return chain

    @property
    def upload_transforms(self) -> Any:
        """The upload chain declared with :meth:`set_upload_transforms`, or None."""
        return self._transforms

    def _frontend_transforms(self, client: Client) -> None:
        """Give the frontend its side of the upload chain, built for the current shared state."""
        if self._transforms is None:
            return
        state = self._shared_state()
        if client.transforms is None or client.transforms.state is not state:
            from openfl_api.transforms.frontend_side import FrontendSide

            client.transforms = FrontendSide(self._transforms, state, self.log, self._hosted, self.timeouts, self._token)

    @exits_fast_when_interrupted
    def download(self) -> bool:
        """Frontend: load a global model of version >= the local one in place. False once ended.

        The backend returns False at once, so the same loop runs on every rank.
        """
        if not self._frontend:
            return False
        client = self._require_client("download()")
        self._frontend_transforms(client)
        return client.download(self._shared_state(), self.rank, self.nick_name)

    @exits_fast_when_interrupted
    def upload(
        self, num_samples: int = 1, metrics: Optional[Mapping[str, float]] = None,
        client: Union[int, str, None] = None,
    ) -> bool:
        """Frontend: send the local state tagged with the local version. False once ended.

        Args:
            num_samples: samples behind this update (FedAvg's weight).
            metrics: scalar metrics to report, e.g. ``{"loss": 0.3}``.
            client: with ``API(clients=[...])``: the virtual client this update belongs to.
        """
        if not self._frontend:
            return False
        meta = check_upload_meta(num_samples, {} if metrics is None else metrics)
        owner = self._require_client("upload()")
        self._frontend_transforms(owner)
        return owner.upload(self._shared_state(), self.rank, self.nick_name, meta["num_samples"], meta["metrics"],
                            client=None if client is None else str(client))

    def evaluate(self, fn: Callable[[], Any], *, client: Union[int, str, None] = None,
                 every: Optional[int] = None) -> bool:
        """Frontend: evaluate the downloaded global model with ``fn`` when it is due, and report it.

        It is due when the backend asks for it (:class:`~openfl_api.evaluation.FederatedEvaluation`)
        or when ``every`` divides its version. ``fn()`` runs under ``torch.no_grad()`` and returns
        ``(num_samples, {name: number})``, on this client's held-out data.

        Args:
            fn: the evaluation function.
            client: with ``API(clients=[...])``: the virtual client evaluating.
            every: also evaluate every ``every``-th version, whatever the backend asks.

        Returns:
            False once the federation has ended, and after the final model was evaluated (train
            no more); True otherwise. The backend returns False at once.

        Raises:
            ConfigurationError: ``fn`` is not callable or returned something else; a bad ``every``
                or ``client``; no model was downloaded yet.
        """
        if not self._frontend:
            return False
        if not callable(fn):
            raise ConfigurationError("api.evaluate(fn) needs a function returning (num_samples, {name: number})")
        if every is not None:
            check_every(every, "api.evaluate")
        owner = self._require_client("evaluate()")
        if owner.ended and owner.final is None:
            return False
        if owner.downloaded is None:
            raise ConfigurationError("api.evaluate() evaluates the downloaded global model: call it after "
                                     "api.download() has returned True")
        config = owner.config
        due = (owner.final is not None or bool(config.get("evaluate"))
               or (every is not None and owner.downloaded % every == 0))
        if not due:
            if every is None and "evaluate" not in config and not self._warned_evaluate:
                self._warned_evaluate = True
                self.log.warning("api.evaluate(...) evaluates nothing: the backend asks for no federated evaluation "
                                 "(attach ofl.FederatedEvaluation(every=k) to the backend) and no every=k was given")
            return True
        num_samples, metrics = run_evaluation(fn, "api.evaluate")
        sent = owner.report(self._shared_state(), self.rank, self.nick_name, num_samples, metrics,
                            client=None if client is None else str(client))
        return sent and owner.final is None

    def update_version(self, version: Optional[int] = None) -> None:
        """Frontend: advance the local version by one, or set it to ``version``."""
        if not self._frontend:
            raise RoleError("update_version() is a frontend method: the backend's version moves only by aggregation")
        client = self._require_client("update_version()")
        if version is None:
            client.version += 1
        elif isinstance(version, int) and not isinstance(version, bool) and version >= 0:
            client.version = version
        else:
            raise ConfigurationError(f"update_version(version=...) must be an integer >= 0 or None, got {version!r}")
