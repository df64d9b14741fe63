"""The backend: one serve loop that owns the global model, fed by one pipe per frontend.

One job per module:

- :mod:`~openfl_api.backend.server`: the serve loop (turns, events, joins and leaves, versions
  aggregated or adopted) and the status line it logs while a version stays open;
- :mod:`~openfl_api.backend.closing`: the end of the loop: held requests answered, pipes closed;
- :mod:`~openfl_api.backend.exchange`: what a turn does with a request: serve downloads, judge
  uploads with the version rules of :mod:`openfl_api.versions`, aggregate versions;
- :mod:`~openfl_api.backend.worker`: the pipe of each frontend and the one request path every
  transport shares;
- :mod:`~openfl_api.backend.accumulate`: adding accepted uploads to the aggregator;
- :mod:`~openfl_api.backend.model`: the global model, its server optimizer and cached encoding;
- :mod:`~openfl_api.backend.addresses`: the served addresses and the watched address file;
- :mod:`~openfl_api.backend.status`: the status line.

Checkpoints are written and read by :mod:`openfl_api.checkpoint`.
"""

from openfl_api.backend.server import Server

__all__ = ["Server"]
