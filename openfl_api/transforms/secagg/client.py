"""A frontend's part in secure aggregation's rounds: keys, shares, the masked update, the unmask shares."""

from __future__ import annotations

import hashlib
import os
import time
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import numpy as np

from openfl_api.transforms import crypto
from openfl_api.transforms.secagg.board import ENDED_EVERY, Board, b64, unb64
from openfl_api.transforms.secagg.masking import add_pair_mask_, neighbours_of, self_mask
from openfl_api.transforms.secagg.settings import FederationEnded, SecAgg, SecAggFailure
from openfl_api.transforms.secagg.shares import deal, open_share

__all__ = ["SecAggClient"]


class SecAggClient:
    """One frontend's part in the rounds: keys, shares, the masked update, the unmask shares.

    Args:
        transform: the :class:`SecAgg` settings.
        board: the board on this frontend's store.
        run: the backend's run id.
        log: a bound logger.
        timeout: the longest wait for the backend's next stage.
        interval: how often a wait that lasts is logged.
    """

    def __init__(self, transform: SecAgg, board: Board, run: str, log: Any, timeout: timedelta,
                 interval: timedelta) -> None:
        self.transform, self.board, self.run, self.log = transform, board, run, log
        self.timeout, self.interval = timeout, interval
        #: test hook: called with the round's context once the masked update is computed.
        self.after_masking: Callable[[Dict[str, Any]], None] = lambda context: None
        #: whether the backend recorded the end of the federation (the frontend's store check)
        self.ended: Callable[[], Any] = lambda: None
        self.joined: Set[str] = set()  # rounds this client advertised keys in

    def _next_round(self, round_id: str) -> None:
        """Wait until the backend opens a round other than ``round_id``."""
        from openfl_api.waiting import logged

        deadline = time.monotonic() + self.timeout.total_seconds()
        with logged(self.log, self.interval, f"the secure-aggregation round after {round_id}"):
            asked = time.monotonic()
            while str(self.board.get("open")["round"]) == round_id:
                if time.monotonic() - asked >= ENDED_EVERY:
                    asked = time.monotonic()
                    if self.ended():
                        raise FederationEnded()
                if time.monotonic() >= deadline:
                    raise SecAggFailure(f"waited {self.timeout} for the secure-aggregation round after {round_id}")
                time.sleep(0.01)

    def _wait(self, round_id: str, key: str, what: str) -> None:
        found = self.board.wait([f"{round_id}/{key}", f"{round_id}/failed"], self.timeout,
                                f"secure aggregation round {round_id}: {what}", self.log, self.interval, self.ended)
        if found.endswith("/failed"):
            reason = self.board.get(f"{round_id}/failed").get("reason", "")
            raise SecAggFailure(f"the backend ended secure-aggregation round {round_id}: {reason}")

    def masked(self, levels: np.ndarray, weight: int, client: str, version: Optional[int],
               clip_range: float) -> Optional[Tuple[np.ndarray, Dict[str, Any]]]:
        """Take part in the rounds up to the masked update of ``levels`` (uint32) with ``weight``.

        ``version``: synchronous mode, the version the update was trained from (a round of a later
        version means this update is stale); None in asynchronous mode (join the open round, or the
        next one if it closed without this client).

        Returns:
            ``(masked uint32 words, context)``, or None with the reason in ``self.skipped`` when
            this update takes no part (stale, or the key stage closed without it).
        """
        board = self.board
        self.skipped = ""
        while True:
            board_open = board.wait(["open"], self.timeout, "the backend to open a secure-aggregation round",
                                    self.log, self.interval, self.ended)
            opened = board.get(board_open)
            round_id, round_version = str(opened["round"]), int(opened["version"])
            if version is not None and round_version > version:
                self.skipped = (f"stale: trained from version {version} but secure aggregation is at version "
                                f"{round_version}")
                return None
            if board.has(f"{round_id}/failed"):
                self._next_round(round_id)  # the backend opens the next round right after a failed one
                continue
            closed = round_id in self.joined or board.has(f"{round_id}/U1")
            if version is not None and closed and round_version == version:
                self.skipped = f"the key stage of secure aggregation round {round_id} closed without this client"
                return None
            if (version is not None and round_version < version) or closed:
                self._next_round(round_id)  # asynchronous: a buffer this client is in, or that filled
                continue
            self.joined.add(round_id)
            keys = crypto.KeyPair(), crypto.KeyPair()
            board.append(f"{round_id}/keys", {"client": client, "c": b64(keys[0].public), "s": b64(keys[1].public),
                                              "w": int(weight)})
            self._wait(round_id, "U1", "the members of the round (U1)")
            u1 = board.get(f"{round_id}/U1")
            members = {m[0]: m for m in u1["members"]}
            if client not in members:
                if version is None:
                    continue  # the buffer filled without this client: join the next round
                self.skipped = f"the key stage of secure aggregation round {round_id} closed without this client"
                return None
            return self._rest(round_id, u1, members, client, keys, levels, weight, clip_range)

    def _rest(self, round_id: str, u1: Dict[str, Any], members: Dict[str, list], client: str,
              keys: Tuple[crypto.KeyPair, crypto.KeyPair], levels: np.ndarray, weight: int,
              clip_range: float) -> Optional[Tuple[np.ndarray, Dict[str, Any]]]:
        board, run = self.board, self.run
        if u1.get("clip_range") != clip_range or u1.get("bits") != self.transform.bits:
            raise SecAggFailure(f"round {round_id} uses clip_range {u1.get('clip_range')} and bits {u1.get('bits')}, "
                                f"this frontend {clip_range} and {self.transform.bits}")
        graph = neighbours_of(sorted(members), u1.get("neighbours"), u1.get("graph"))
        mine = graph[client]
        x_of = {m: int(members[m][1]) for m in members}
        holders = [client, *mine]
        t = int(u1["t"])
        seed_b = os.urandom(32)
        sealed, digests = deal(keys[0], keys[1], seed_b, x_of[client],
                               {h: (x_of[h], members[h][2]) for h in holders}, t, run, round_id)
        board.append(f"{round_id}/shares", {"client": client, "sealed": sealed, "digests": digests,
                                            "commit": hashlib.sha256(seed_b).hexdigest()})
        self._wait(round_id, "U2", "the share holders of the round (U2)")
        u2 = board.get(f"{round_id}/U2")
        if client not in u2["members"]:
            self.skipped = f"secure aggregation round {round_id} went on without this client's shares"
            return None
        if not board.has(f"{round_id}/inbox/{x_of[client]}"):
            raise SecAggFailure(f"secure aggregation round {round_id} lists this client in U2 but holds no inbox of "
                                "shares for it: the backend must write every member's inbox before U2")
        inbox = board.get(f"{round_id}/inbox/{x_of[client]}")
        held: Dict[str, Tuple[bytes, bytes]] = {}
        bad: List[str] = []
        for dealer, text in inbox.items():
            if dealer not in members:
                continue
            opened = open_share(keys[0], members[dealer][2], text, x_of[dealer], x_of[client], run, round_id)
            if opened is None:
                bad.append(dealer)
                continue
            held[dealer] = opened
        if bad:
            self.log.warning(f"secure aggregation round {round_id}: shares from {sorted(bad)} failed authentication "
                             "(altered, or sealed with a wrong key); the backend is told")
        board.append(f"{round_id}/checked", {"client": client, "bad": sorted(bad)})
        self._wait(round_id, "masking", "the members that mask (after the share check)")
        masking = board.get(f"{round_id}/masking")["members"]
        if client not in masking:
            self.skipped = f"secure aggregation round {round_id} refused this client: {masking and 'see the backend log'}"
            return None
        size = levels.size
        y = levels * np.uint32(weight)
        y += self_mask(seed_b, run, round_id, x_of[client], size)
        for other in mine:
            if other in masking:
                add_pair_mask_(y, keys[1].agree(unb64(members[other][3])), run, round_id, x_of[client], x_of[other])
        context = {"round": round_id, "client": client, "held": held, "masking": masking, "x_of": x_of,
                   "members": members}
        self.after_masking(context)
        return y, context

    def unmask(self, context: Dict[str, Any]) -> None:
        """After an accepted masked upload: send the shares the backend needs to unmask the sum."""
        round_id, client = context["round"], context["client"]
        self._wait(round_id, "U3", "the members whose masked update arrived (U3)")
        survivors = set(self.board.get(f"{round_id}/U3")["members"])
        if client not in survivors:
            return
        masking = set(context["masking"])
        if not survivors <= masking:
            raise SecAggFailure(f"round {round_id}: U3 names clients that were not allowed to mask; refusing to unmask")
        b_out = {d: shares[1].hex() for d, shares in context["held"].items() if d in survivors}
        s_out = {d: shares[0].hex() for d, shares in context["held"].items() if d in masking - survivors}
        self.board.append(f"{round_id}/unmask", {"client": client, "b": b_out, "s": s_out})
