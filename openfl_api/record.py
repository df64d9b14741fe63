"""The record of a run: one JSON line per event on the backend, and the sinks it feeds.

``API(record="run.jsonl")`` (or ``python -m openfl_api.launch --record run.jsonl ...``) makes the
backend write a JSON Lines file: one object per line, one line per event, each with ``schema``
(:data:`SCHEMA`), ``event``, ``time`` (Unix seconds) and ``elapsed`` (seconds the backend has
served this run, not counting the time between a crash and its resume). The events:

``run``
    the serve loop started: ``version``, ``synchronous``, ``max_version`` (of ``StopAtVersion``,
    or null), ``openfl_api`` and ``torch`` versions.
``resume``
    the serve loop started again from a checkpoint: ``version``, ``checkpoint``.
``join`` / ``leave``
    a frontend joined or left: ``rank``, ``nick_name``, ``address``.
``upload``
    an upload was accepted or discarded: ``version`` (the global version then), ``trained_from``,
    ``client``, ``rank``, ``accepted``, ``reason`` (when discarded), ``staleness``,
    ``num_samples``, ``weight``, ``metrics``, ``bytes``.
``report``
    a frontend reported its evaluation: ``version`` (evaluated), ``client``, ``rank``,
    ``num_samples``, ``metrics``, ``bytes``.
``version``
    a version was aggregated: ``version`` (the new one), ``uploads``, ``discarded``,
    ``participants`` (client ids), ``num_samples``, ``staleness`` (``mean``, ``max``),
    ``bytes_in`` and ``bytes_out`` since the previous version, ``timing`` (``round``,
    ``waiting``, ``receiving``, ``aggregating`` in seconds, see :mod:`openfl_api.timing`) and
    ``metrics``: the training metrics of the accepted uploads, aggregated.
``evaluation``
    the evaluation of a version: ``kind`` (``"federated"``: the frontends' reports aggregated;
    ``"centralized"`` or any kind given to ``api.log_metrics``), ``version``, ``clients``,
    ``num_samples`` and ``metrics``.
``end``
    the serve loop ended: ``version``, ``reason``.

Aggregated metrics are ``{metric: {statistic: value}}`` (:mod:`openfl_api.metrics`): by default
the ``mean`` weighted by samples, the ``min`` and the ``max``.

**Written safely.** Each line is written with one ``write`` call as soon as its event happened,
so a crash loses at most the line being written. A backend resumed from a checkpoint
(``API(resume=...)``) cuts the record back to where it was when that checkpoint was written (the
record's length is kept in the checkpoint) and appends from there: the versions redone after the
resume are not written twice; frontends that join it again send the evaluation reports of the
model they downloaded last once more (:mod:`openfl_api.reporting`), since those received after the
checkpoint were lost. A run that is not resumed starts the file afresh.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Union

from openfl_api.errors import ConfigurationError
from openfl_api.launch.config import RECORD_VAR, TENSORBOARD_VAR
from openfl_api.metrics import History, MetricRules, Result, summarize
from openfl_api.parser import environ
from openfl_api.payload import validate_meta
from openfl_api.step.base import BACKEND, Step, Transfer
from openfl_api.timing import RoundClock
from openfl_api.versions import client_order

__all__ = ["SCHEMA", "Record", "Recorder", "RecordError", "read_record", "series", "check_log_metrics"]

#: The record's schema number, in every line.
SCHEMA = 1

PathLike = Union[str, Path]


class RecordError(ConfigurationError):
    """A file is not a readable record of this schema (the message names the line)."""


@dataclass(frozen=True)
class Record:
    """What the backend records of a run, and where it goes.

    ``API(record="run.jsonl")`` is short for ``API(record=Record(path="run.jsonl"))``.

    Args:
        path: the JSON Lines file to write, or None to keep the record in memory only (the
            report table and the progress line still show it).
        tensorboard: a folder for TensorBoard event files (``torch.utils.tensorboard``; install
            the ``tensorboard`` extra), or None.
        progress: the progress line on the backend: None draws it when its output is a terminal
            and tqdm is installed; True draws it always (tqdm is then required); False never.
        metrics: the statistics per metric (default: weighted mean, min and max).

    Raises:
        ConfigurationError: a value of the wrong type, an empty path.
    """

    path: Optional[PathLike] = None
    tensorboard: Optional[PathLike] = None
    progress: Optional[bool] = None
    metrics: Optional[MetricRules] = None

    def __post_init__(self) -> None:
        for label in ("path", "tensorboard"):
            value = getattr(self, label)
            if value is not None and (not isinstance(value, (str, Path)) or not str(value)):
                raise ConfigurationError(f"Record({label}=...) must be a non-empty path or None, got {value!r}")
        if self.progress is not None and not isinstance(self.progress, bool):
            raise ConfigurationError(f"Record(progress=...) must be True, False or None, got {self.progress!r}")
        if self.metrics is not None and not isinstance(self.metrics, MetricRules):
            raise ConfigurationError(f"Record(metrics=...) must be an openfl_api.metrics.MetricRules, "
                                     f"got {type(self.metrics).__name__}")

    @staticmethod
    def resolve(record: Any) -> Optional["Record"]:
        """The options ``API(record=...)`` means: a path, a Record, None (the launcher's
        ``--record``/``--tensorboard`` through the environment, else in memory), or False (nothing).

        Raises:
            ConfigurationError: anything else.
        """
        if record is False:
            return None
        if isinstance(record, (str, Path)):
            record = Record(path=record)
        elif record is None or record is True:
            record = Record()
        elif not isinstance(record, Record):
            raise ConfigurationError(f"API(record=...) must be a path, an openfl_api.Record, None or False, "
                                     f"got {type(record).__name__}")
        variables = environ()
        path = record.path if record.path is not None else (variables.get(RECORD_VAR) or None)
        board = record.tensorboard if record.tensorboard is not None else (variables.get(TENSORBOARD_VAR) or None)
        return Record(path=path, tensorboard=board, progress=record.progress, metrics=record.metrics)

    def check(self) -> None:
        """Check, on the backend before it serves, that the record can be written where asked.

        Raises:
            ConfigurationError: the record's folder does not exist, or a sink's package is missing.
        """
        if self.path is not None and not Path(self.path).parent.is_dir():
            raise ConfigurationError(f"the record's folder {Path(self.path).parent} does not exist; create it or "
                                     "record to a path in an existing folder")
        if self.tensorboard is not None:
            _require("tensorboard", "tensorboard", "recording to TensorBoard")
        if self.progress is True:
            _require("tqdm", "progress", "Record(progress=True)")


def _require(package: str, extra: str, what: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ConfigurationError(f"{what} needs the {package} package: pip install 'openfl_api[{extra}]'")


class Recorder(Step):
    """The backend step that writes the record: it sees every event after the other steps.

    The API attaches it last when the backend starts serving (unless ``API(record=False)``);
    ``api.history`` holds what it aggregated, ``api.log_metrics`` adds evaluations of one's own.

    Args:
        options: what to record and where.
        clock: the serve loop's round clock.
        max_version: the version a ``StopAtVersion`` ends at, or None (the progress line's total).
        synchronous: whether the federation is synchronous.
        log: a bound logger.
    """

    roles = frozenset({BACKEND})

    def __init__(self, options: Record, clock: RoundClock, max_version: Optional[int], synchronous: bool,
                 log: Any) -> None:
        self.options = options
        self.rules = options.metrics or MetricRules()
        self.history = History()
        self._clock = clock
        self._max_version = max_version
        self._synchronous = synchronous
        self._log = log
        self._fd: Optional[int] = None
        self._offset = 0
        self._lock = threading.Lock()
        self._elapsed = 0.0  # served before this process (a resumed run)
        self._started = time.monotonic()
        self._saved: Optional[Dict[str, Any]] = None  # the state found in the checkpoint resumed from
        self._sinks: List[Any] = []
        self._open = False
        self._closed = False
        # The version being built: accepted uploads, and what went through the pipes since the last version.
        self._results: List[Result] = []
        self._staleness: List[int] = []
        self._discarded = 0
        self._bytes_in = 0
        self._bytes_out = 0
        # Evaluations not aggregated yet: the clients served a version to evaluate, and their reports.
        self._asked: Dict[int, Set[str]] = {}
        self._reports: Dict[int, Dict[str, Result]] = {}
        self._trained_from: Dict[str, int] = {}  # client -> the newest version it uploaded an update of
        self._finished_evaluations = -1  # reports of versions up to this one come late

    # ----------------------------------------------------------------- life cycle
    def start(self, version: int, resumed_from: Optional[str]) -> None:
        """Open the record and the sinks as the serve loop starts at ``version``; ``resumed_from``
        names the checkpoint the backend resumed from, if any."""
        saved = self._saved if resumed_from is not None else None
        continued = False
        if self.options.path is not None:
            target = Path(self.options.path)
            continued = saved is not None and self._continue(target, saved)
            if not continued:
                self._fresh(target)
        if saved is not None:
            self._elapsed = float(saved.get("elapsed", 0.0))
            self._results = [Result(str(c), int(n), dict(m)) for c, n, m in saved.get("results", [])]
            self._staleness = [int(x) for x in saved.get("staleness", [])]
            self._discarded, self._bytes_in, self._bytes_out = (int(x) for x in saved.get("counts", (0, 0, 0)))
            self._finished_evaluations = int(saved.get("finished_evaluations", -1))
        self._started = time.monotonic()
        self._sinks = _sinks(self.options, self._max_version, version, saved is not None, self._log)
        self._open = True
        import torch

        import openfl_api

        fields = {"version": version, "synchronous": self._synchronous, "max_version": self._max_version,
                  "openfl_api": openfl_api.__version__, "torch": torch.__version__}
        if saved is not None and (continued or self.options.path is None):
            self._write({"event": "resume", **fields, "checkpoint": str(resumed_from)})
        else:
            self._write({"event": "run", **fields})

    def _fresh(self, target: Path) -> None:
        folder = target.parent
        if not folder.is_dir():
            raise ConfigurationError(f"the record's folder {folder} does not exist; create it or record to a path "
                                     "in an existing folder")
        replaced = target.exists()
        self._fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        self._offset = 0
        self._log.info(f"recording to {target}{' (replacing an earlier record)' if replaced else ''}")

    def _continue(self, target: Path, saved: Dict[str, Any]) -> bool:
        """Cut the record back to its length at the checkpoint and reopen it; False if it cannot be."""
        offset = int(saved.get("offset", -1))
        if saved.get("path") != str(target) or not target.exists() or target.stat().st_size < offset:
            self._log.warning(f"the record {target} does not hold what the checkpoint resumed from expects "
                              f"({saved.get('path')}, {offset} bytes); starting it afresh")
            return False
        os.truncate(target, offset)
        for entry in read_record(target):
            self.history.add(entry)
        self._fd = os.open(target, os.O_WRONLY | os.O_APPEND)
        self._offset = offset
        self._log.info(f"recording to {target}, continued from the checkpoint's {offset} bytes")
        return True

    def close(self, version: int, reason: str) -> None:
        """The serve loop ended: aggregate the evaluations still open, write ``end``, close everything."""
        if not self._open or self._closed:
            return
        self._closed = True
        try:
            for pending in sorted(set(self._asked) | set(self._reports)):
                self._evaluated(pending)
            self._write({"event": "end", "version": version, "reason": reason})
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            for sink in self._sinks:
                sink.close()
        if self.options.path is not None:
            self._log.info(f"the record of this run is in {self.options.path}; draw it with "
                           f"python -m openfl_api.plot {self.options.path}")

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Where the record stands (its length, the served time, the version in progress, the last
        version whose evaluation was aggregated), for a resume."""
        return {
            "path": None if self.options.path is None else str(Path(self.options.path)),
            "offset": self._offset,
            "elapsed": self._elapsed + time.monotonic() - self._started,
            "results": [[r.client, r.num_samples, dict(r.metrics)] for r in self._results],
            "staleness": list(self._staleness),
            "counts": [self._discarded, self._bytes_in, self._bytes_out],
            "finished_evaluations": self._finished_evaluations,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._saved = dict(state)

    # ----------------------------------------------------------------- events
    def on_join(self, api: Any, peer: Any) -> None:
        self._write({"event": "join", "rank": peer.rank, "nick_name": peer.nick_name,
                     "address": peer.address.init_method})

    def on_leave(self, api: Any, peer: Any) -> None:
        self._write({"event": "leave", "rank": peer.rank, "nick_name": peer.nick_name,
                     "address": peer.address.init_method})
        self._check_evaluations(api)

    def after_download(self, api: Any, transfer: Transfer) -> None:
        self._bytes_out += transfer.nbytes
        if transfer.config.get("evaluate") and transfer.version > self._finished_evaluations:
            self._asked.setdefault(transfer.version, set()).update(transfer.clients)

    def after_upload(self, api: Any, transfer: Transfer) -> None:
        self._bytes_in += transfer.nbytes
        if transfer.accepted:
            self._results.append(Result(transfer.client, transfer.num_samples, dict(transfer.metrics)))
            self._staleness.append(transfer.staleness)
        else:
            self._discarded += 1
        if self._fd is not None or self._sinks:
            entry = {"event": "upload", "version": api.version, "trained_from": transfer.version,
                     "client": transfer.client, "rank": transfer.rank, "accepted": bool(transfer.accepted)}
            if not transfer.accepted:
                entry["reason"] = transfer.reason
            entry.update(staleness=transfer.staleness, num_samples=transfer.num_samples, weight=transfer.weight,
                         metrics=dict(transfer.metrics), bytes=transfer.nbytes)
            self._write(entry)
        if self._asked:
            if transfer.version > self._trained_from.get(transfer.client, -1):
                self._trained_from[transfer.client] = transfer.version
            self._check_evaluations(api)

    def after_evaluate(self, api: Any, transfer: Transfer) -> None:
        self._bytes_in += transfer.nbytes
        self._write({"event": "report", "version": transfer.version, "client": transfer.client,
                     "rank": transfer.rank, "num_samples": transfer.num_samples, "metrics": dict(transfer.metrics),
                     "bytes": transfer.nbytes})
        if transfer.version <= self._finished_evaluations:
            self._log.debug(f"the evaluation report of client {transfer.client} for version {transfer.version} "
                            "came after that version's evaluation was aggregated; it is recorded, not aggregated")
            return
        self._reports.setdefault(transfer.version, {})[transfer.client] = Result(
            transfer.client, transfer.num_samples, dict(transfer.metrics))
        self._check_evaluations(api)

    def after_aggregate(self, api: Any) -> None:
        timing = self._clock.last
        summary = summarize(self._results, self.rules)
        staleness = self._staleness
        self._write({
            "event": "version", "version": api.version, "uploads": len(self._results), "discarded": self._discarded,
            "participants": sorted((r.client for r in self._results), key=client_order),
            "num_samples": summary.num_samples,
            "staleness": {"mean": math.fsum(staleness) / len(staleness) if staleness else 0.0,
                          "max": max(staleness, default=0)},
            "bytes_in": self._bytes_in, "bytes_out": self._bytes_out,
            "timing": None if timing is None else timing.as_dict(),
            "metrics": summary.metrics,
        })
        self._results, self._staleness = [], []
        self._discarded = self._bytes_in = self._bytes_out = 0
        self._check_evaluations(api)

    # ----------------------------------------------------------------- evaluations
    def _check_evaluations(self, api: Any) -> None:
        """Aggregate the evaluation of each version that no download will be served of any more
        (a newer version exists) once every client served it to evaluate has reported it, gone on
        to upload an update of it or a later version, or left."""
        for version in sorted(set(self._asked) | set(self._reports)):
            if version >= api.version:
                break
            reports = self._reports.get(version, {})
            connected = set(api.clients)
            if all(c in reports or self._trained_from.get(c, -1) >= version or c not in connected
                   for c in self._asked.get(version, ())):
                self._evaluated(version)

    def _evaluated(self, version: int) -> None:
        reports = self._reports.pop(version, {})
        self._asked.pop(version, None)
        self._finished_evaluations = max(self._finished_evaluations, version)
        if not reports:
            return
        summary = summarize(list(reports.values()), self.rules)
        self._write({"event": "evaluation", "kind": "federated", "version": version, "clients": summary.clients,
                     "num_samples": summary.num_samples, "metrics": summary.metrics})

    def log_metrics(self, kind: str, metrics: Mapping[str, float], version: int,
                    num_samples: Optional[int] = None) -> None:
        """Record an evaluation of one's own (see ``API.log_metrics``); arguments already checked."""
        entry: Dict[str, Any] = {"event": "evaluation", "kind": kind, "version": version, "clients": None,
                                 "num_samples": num_samples,
                                 "metrics": {name: {"mean": float(value)} for name, value in sorted(metrics.items())}}
        self._write(entry)

    # ----------------------------------------------------------------- writing
    def _entry(self, fields: Dict[str, Any]) -> Dict[str, Any]:
        return {"schema": SCHEMA, "event": fields.pop("event"), "time": time.time(),
                "elapsed": self._elapsed + time.monotonic() - self._started, **fields}

    def _write(self, fields: Dict[str, Any]) -> None:
        if self._fd is None and not self._sinks and fields["event"] not in _KEPT:
            return  # in memory only, and the history keeps versions and evaluations alone
        entry = self._entry(fields)
        with self._lock:  # api.log_metrics may be called from outside the serve loop's turns
            if self._fd is not None:
                data = (json.dumps(entry, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
                self._offset += len(data)
            self.history.add(entry)
            for sink in self._sinks:
                sink.write(entry)

    def __repr__(self) -> str:
        return f"Recorder(path={None if self.options.path is None else str(self.options.path)!r})"


_KEPT = ("version", "evaluation")


def _sinks(options: Record, max_version: Optional[int], version: int, resumed: bool, log: Any) -> List[Any]:
    from openfl_api.progress import Progress

    sinks: List[Any] = []
    if options.tensorboard is not None:
        from openfl_api.sinks import TensorBoard

        sinks.append(TensorBoard(options.tensorboard, purge_step=version + 1 if resumed else None))
    progress = Progress.open(options.progress, total=max_version, initial=version, log=log)
    if progress is not None:
        sinks.append(progress)
    return sinks


def check_log_metrics(kind: Any, metrics: Any, version: Any, num_samples: Any) -> Dict[str, float]:
    """Validate ``api.log_metrics``'s arguments; returns the metrics as floats.

    Raises:
        ConfigurationError: with what must hold.
    """
    if not isinstance(kind, str) or not kind.isidentifier() or kind in ("train", "federated"):
        raise ConfigurationError(f"log_metrics(kind=...) must be an identifier such as 'centralized' (not 'train' "
                                 f"or 'federated', which the record fills itself), got {kind!r}")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ConfigurationError(f"log_metrics(version=...) must be an integer >= 0, got {version!r}")
    if num_samples is not None and (not isinstance(num_samples, int) or isinstance(num_samples, bool)
                                    or num_samples < 1):
        raise ConfigurationError(f"log_metrics(num_samples=...) must be an integer >= 1 or None, got {num_samples!r}")
    return validate_meta({"num_samples": 1, "metrics": metrics}, error=ConfigurationError,
                         where="log_metrics")["metrics"]


def read_record(path: PathLike) -> List[Dict[str, Any]]:
    """The entries of a record, in order.

    A last line without its newline (the run was cut while writing it) is left out; any other
    line that is not an entry of this schema is an error.

    Raises:
        RecordError: the file is missing, or a line is not a JSON object of schema :data:`SCHEMA`
            with an ``event``; the message names the file and the line.
    """
    return list(_entries(Path(path)))


def _entries(path: Path) -> Iterator[Dict[str, Any]]:
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        raise RecordError(f"cannot read the record {path}: {exc.strerror or exc}") from None
    # The last piece is "" when the file ends with a newline, else a line cut short: left out.
    for number, line in enumerate(text.split("\n")[:-1], 1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict) or "event" not in entry:
            raise RecordError(f"{path}:{number} is not a record entry (a JSON object with an 'event'): "
                              f"{line[:80]!r}")
        if entry.get("schema") != SCHEMA:
            raise RecordError(f"{path}:{number} has schema {entry.get('schema')!r}; this openfl_api reads schema "
                              f"{SCHEMA}")
        yield entry


def series(entries: Sequence[Mapping[str, Any]]) -> Dict[str, List[tuple]]:
    """Per metric the points ``(version, elapsed, value)`` of a record: ``train/<metric>`` from the
    versions, ``<kind>/<metric>`` from the evaluations; the mean of each (or its only statistic)."""
    found: Dict[str, List[tuple]] = {}
    for entry in entries:
        if entry.get("event") == "version":
            kind = "train"
        elif entry.get("event") == "evaluation":
            kind = str(entry.get("kind"))
        else:
            continue
        for metric, stats in (entry.get("metrics") or {}).items():
            value = stats.get("mean") if isinstance(stats, dict) else None
            if value is None and isinstance(stats, dict) and len(stats) == 1:
                value = next(iter(stats.values()))
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                found.setdefault(f"{kind}/{metric}", []).append((int(entry["version"]), float(entry["elapsed"]),
                                                                 float(value)))
    return found
