"""Where the record's entries go besides its file: TensorBoard.

:func:`scalars` says which scalars an entry of the record holds, under TensorBoard's tag names;
:class:`TensorBoard` writes them with ``torch.utils.tensorboard`` (install the ``tensorboard``
extra), the version as the step and the entry's ``time`` as the wall time. Statistics other than
the mean get their own tag::

    train/loss          the mean of the accepted uploads' loss, per version
    train/loss/min      and its minimum, maximum
    federated/accuracy  the frontends' evaluation of each evaluated version
    centralized/accuracy
    timing/round, timing/waiting, timing/receiving, timing/aggregating
    bytes/in, bytes/out, uploads
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple, Union

from openfl_api.errors import ConfigurationError

__all__ = ["scalars", "TensorBoard"]


def scalars(entry: Mapping[str, Any]) -> List[Tuple[str, float]]:
    """The ``(tag, value)`` scalars of one record entry (none for events without figures)."""
    event = entry.get("event")
    found: List[Tuple[str, float]] = []
    if event == "version":
        kind = "train"
        timing = entry.get("timing") or {}
        found += [(f"timing/{part}", float(timing[part])) for part in ("round", "waiting", "receiving", "aggregating")
                  if part in timing]
        found += [("bytes/in", float(entry["bytes_in"])), ("bytes/out", float(entry["bytes_out"])),
                  ("uploads", float(entry["uploads"]))]
    elif event == "evaluation":
        kind = str(entry["kind"])
    else:
        return found
    for metric, stats in sorted((entry.get("metrics") or {}).items()):
        for statistic, value in sorted(stats.items()):
            if value is not None:
                tag = f"{kind}/{metric}" if statistic == "mean" else f"{kind}/{metric}/{statistic}"
                found.append((tag, float(value)))
    return found


class TensorBoard:
    """Writes the record's scalars to TensorBoard event files in ``logdir``.

    Args:
        logdir: the folder (created if missing).
        purge_step: a resumed run's first version: TensorBoard drops the events of earlier runs
            into this folder from this version on, so redone versions are not shown twice.

    Raises:
        ConfigurationError: tensorboard is not installed.
    """

    def __init__(self, logdir: Union[str, Path], purge_step: Optional[int] = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigurationError(f"recording to TensorBoard needs the tensorboard package ({exc}); "
                                     "pip install 'openfl_api[tensorboard]'") from None
        self.logdir = Path(logdir)
        self._writer = SummaryWriter(log_dir=str(self.logdir), purge_step=purge_step, flush_secs=10)

    def write(self, entry: Mapping[str, Any]) -> None:
        """Add the scalars of ``entry`` at its version."""
        for tag, value in scalars(entry):
            self._writer.add_scalar(tag, value, global_step=int(entry["version"]), walltime=float(entry["time"]))

    def close(self) -> None:
        self._writer.close()
