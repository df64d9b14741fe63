"""Tests of the wire format: frames, piece tables, and gloo pipes over a real TCPStore on loopback.

Both sides of a gloo pipe live in this process (the backend side is built on a thread); every
wait is bounded by TIMEOUT and every pipe is closed.
"""

from __future__ import annotations

import os
import socket
import threading
from datetime import timedelta
from typing import Iterator, List, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed import TCPStore

from openfl_api.errors import ProtocolError
from openfl_api.transport.base import (
    MAGIC, MAX_PIECES, REPLIES, REQUESTS, Kind, Limits, Message, Pieces, check_frame, check_pieces,
)
from openfl_api.transport.gloo import INLINE, GlooPipe, open_gloo_pipe
from openfl_api.transport.memory import open_memory_pipe

TIMEOUT = timedelta(seconds=10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def open_pair() -> Tuple[GlooPipe, GlooPipe]:
    """(backend side, frontend side) of one gloo pipe on a fresh TCPStore."""
    port = free_port()
    backend_store = TCPStore("127.0.0.1", port, None, True, timeout=TIMEOUT, wait_for_workers=False)
    frontend_store = TCPStore("127.0.0.1", port, None, False, timeout=TIMEOUT)
    built: List[GlooPipe] = []
    thread = threading.Thread(
        target=lambda: built.append(open_gloo_pipe(backend_store, "pipe/", 0, TIMEOUT, "127.0.0.1")), daemon=True
    )
    thread.start()
    frontend = open_gloo_pipe(frontend_store, "pipe/", 1, TIMEOUT, "127.0.0.1")
    thread.join(TIMEOUT.total_seconds())
    if not built:
        frontend.close()
        raise AssertionError("the backend side of the pipe was not built")
    return built[0], frontend


@pytest.fixture
def pipes() -> Iterator[Tuple[GlooPipe, GlooPipe]]:
    backend, frontend = open_pair()
    yield backend, frontend
    frontend.close()
    backend.close()


def zeros(size: int) -> torch.Tensor:
    return torch.zeros(size, dtype=torch.uint8)


def send_on_thread(pipe: GlooPipe, message: Message) -> threading.Thread:
    thread = threading.Thread(target=pipe.send, args=(message, TIMEOUT), daemon=True)
    thread.start()
    return thread


def frame(kind: int, header: int, payload: int, pieces: int) -> torch.Tensor:
    return torch.tensor([MAGIC, kind, header, payload, pieces], dtype=torch.int64)


LIMITS = Limits(REQUESTS, max_header=1 << 20, max_payload=1 << 20)


# ----------------------------------------------------------------- frames and piece tables


def test_a_frame_with_pieces_but_no_payload_is_refused() -> None:
    with pytest.raises(ProtocolError, match="cannot come in 1 pieces"):
        check_frame(frame(int(Kind.UPLOAD), 0, 0, 1), LIMITS)


def test_a_frame_with_more_pieces_than_bytes_is_refused() -> None:
    with pytest.raises(ProtocolError, match="cannot come in 9 pieces"):
        check_frame(frame(int(Kind.UPLOAD), 0, 8, 9), LIMITS)


def test_a_frame_with_more_pieces_than_the_limit_is_refused() -> None:
    with pytest.raises(ProtocolError, match=f"min\\(bytes, {MAX_PIECES}\\)"):
        check_frame(frame(int(Kind.UPLOAD), 0, 1 << 20, MAX_PIECES + 1), LIMITS)


@pytest.mark.parametrize("rows", [[(0, 4), (2, 4)], [(4, 4), (0, 4)], [(0, 0)], [(6, 4)], [(-1, 2)]],
                         ids=["overlap", "backwards", "empty", "past the end", "negative"])
def test_a_piece_table_that_does_not_fit_the_payload_is_refused(rows) -> None:
    with pytest.raises(ProtocolError, match="does not fit"):
        check_pieces(torch.tensor(rows, dtype=torch.int64), payload_len=8)


INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@settings(max_examples=300, deadline=None)
@given(words=st.lists(INT64, min_size=5, max_size=5))
def test_any_frame_is_either_accepted_within_the_limits_or_refused(words) -> None:
    try:
        kind, header, payload, pieces = check_frame(torch.tensor(words, dtype=torch.int64), LIMITS)
    except ProtocolError:
        return
    assert 0 <= header <= LIMITS.max_header and 0 <= payload <= LIMITS.max_payload
    assert (pieces == 0) == (payload == 0) and pieces <= min(payload, MAX_PIECES)


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.tuples(INT64, INT64), min_size=1, max_size=8), payload=st.integers(1, 1 << 40))
def test_any_piece_table_is_either_a_tiling_inside_the_payload_or_refused(rows, payload) -> None:
    try:
        accepted = check_pieces(torch.tensor(rows, dtype=torch.int64), payload)
    except ProtocolError:
        return
    ends = [offset + size for offset, size in accepted]
    assert all(size >= 1 for _, size in accepted) and accepted[0][0] >= 0 and ends[-1] <= payload
    assert all(end <= offset for end, (offset, _) in zip(ends, accepted[1:]))


def test_pieces_gather_into_a_zero_padded_flat_buffer() -> None:
    pieces = Pieces(8, ((1, torch.tensor([1, 2], dtype=torch.uint8)), (5, torch.tensor([3], dtype=torch.uint8))))
    assert pieces.flat().tolist() == [0, 1, 2, 0, 0, 3, 0, 0]
    assert pieces.rows == ((1, 2), (5, 1))


def test_the_memory_pipe_delivers_pieces_as_the_flat_buffer() -> None:
    backend, frontend = open_memory_pipe("pieces-test", 0), open_memory_pipe("pieces-test", 1)
    frontend.send(Message(Kind.UPLOAD, b"{}", Pieces(4, ((2, torch.tensor([9, 9], dtype=torch.uint8)),))), TIMEOUT)
    received = backend.recv(LIMITS, TIMEOUT, TIMEOUT, zeros)
    assert received.payload.tolist() == [0, 0, 9, 9]
    frontend.close()
    backend.close()


def test_a_frame_given_as_five_ints_is_checked_as_the_tensor_is() -> None:
    assert check_frame((MAGIC, int(Kind.UPLOAD), 2, 8, 1), LIMITS) == (Kind.UPLOAD, 2, 8, 1)
    with pytest.raises(ProtocolError, match="magic"):
        check_frame((MAGIC + 1, int(Kind.UPLOAD), 2, 8, 1), LIMITS)


def test_the_memory_pipe_copies_a_payload_unless_the_sender_hands_it_over() -> None:
    backend, frontend = open_memory_pipe("owned-test", 0), open_memory_pipe("owned-test", 1)
    kept, given = torch.ones(4, dtype=torch.uint8), torch.ones(4, dtype=torch.uint8)
    frontend.send(Message(Kind.UPLOAD, b"{}", kept), TIMEOUT)
    frontend.send(Message(Kind.UPLOAD, b"{}", given, owned=True), TIMEOUT)
    copied = backend.recv(LIMITS, TIMEOUT, TIMEOUT, zeros).payload
    handed = backend.recv(LIMITS, TIMEOUT, TIMEOUT, zeros).payload
    assert copied.data_ptr() != kept.data_ptr() and torch.equal(copied, kept)
    assert handed.data_ptr() == given.data_ptr()
    frontend.close()
    backend.close()


def test_the_memory_pipe_refuses_a_message_over_the_receivers_limits() -> None:
    backend, frontend = open_memory_pipe("limits-test", 0), open_memory_pipe("limits-test", 1)
    frontend.send(Message(Kind.UPLOAD, b"{}", torch.ones(64, dtype=torch.uint8)), TIMEOUT)
    with pytest.raises(ProtocolError, match="payload of 64 bytes is over the limit of 8"):
        backend.recv(Limits(REQUESTS, 64, 8), TIMEOUT, TIMEOUT, zeros)
    frontend.close()
    backend.close()


def test_after_deliver_to_the_senders_thread_hands_each_message_over_in_order() -> None:
    backend, frontend = open_memory_pipe("deliver-test", 0), open_memory_pipe("deliver-test", 1)
    frontend.send(Message(Kind.DOWNLOAD, b"queued"), TIMEOUT)  # before deliver_to: kept, then handed first
    seen: List[Tuple[bytes, str]] = []
    closed: List[str] = []
    assert backend.deliver_to(lambda m: seen.append((m.header, threading.current_thread().name)), closed.append)
    here = threading.current_thread().name
    sender = threading.Thread(target=frontend.send, args=(Message(Kind.DOWNLOAD, b"sent"), TIMEOUT), name="sender")
    sender.start()
    sender.join(TIMEOUT.total_seconds())
    frontend.close()
    assert seen == [(b"queued", here), (b"sent", "sender")]
    assert closed == ["connection closed by peer"]
    backend.close()


def test_a_pipe_that_needs_a_reading_thread_declines_deliver_to(pipes) -> None:
    backend, _ = pipes
    assert backend.deliver_to(lambda message: None, lambda reason: None) is False


# ----------------------------------------------------------------- gloo pipes


def test_pieces_with_gaps_land_at_their_offsets_and_leave_the_gaps_alone(pipes) -> None:
    backend, frontend = pipes
    first, second = torch.arange(1, 101, dtype=torch.uint8), torch.full((50,), 7, dtype=torch.uint8)
    sender = send_on_thread(frontend, Message(Kind.UPLOAD, b'{"v":1}', Pieces(300, ((10, first), (200, second)))))
    received = backend.recv(LIMITS, TIMEOUT, TIMEOUT, lambda size: torch.full((size,), 255, dtype=torch.uint8))
    sender.join(TIMEOUT.total_seconds())
    expected = torch.full((300,), 255, dtype=torch.uint8)
    expected[10:110], expected[200:250] = first, second
    assert (received.kind, received.header) == (Kind.UPLOAD, b'{"v":1}')
    assert torch.equal(received.payload, expected)


def test_a_header_larger_than_the_inline_block_arrives_whole(pipes) -> None:
    backend, frontend = pipes
    header = bytes(range(256)) * (INLINE // 256 + 3)
    sender = send_on_thread(frontend, Message(Kind.UPLOAD, header, torch.ones(64, dtype=torch.uint8)))
    received = backend.recv(LIMITS, TIMEOUT, TIMEOUT, zeros)
    sender.join(TIMEOUT.total_seconds())
    assert received.header == header and received.payload.tolist() == [1] * 64


def test_progress_reports_each_piece_in_order_as_it_lands(pipes) -> None:
    backend, frontend = pipes
    pieces = Pieces(1000, tuple((offset, torch.full((100,), offset // 100, dtype=torch.uint8))
                                for offset in range(0, 1000, 200)))
    reports: List[Tuple[int, int]] = []
    holder: List[torch.Tensor] = []

    def alloc(size: int) -> torch.Tensor:
        holder.append(zeros(size))
        return holder[0]

    sender = send_on_thread(backend, Message(Kind.MODEL, b"{}", pieces))
    frontend.recv(Limits(REPLIES, 64, 1000), TIMEOUT, TIMEOUT, alloc,
                  lambda end: reports.append((end, int(holder[0][end - 1]))))
    sender.join(TIMEOUT.total_seconds())
    # Each report names the end of a piece whose bytes are already in the buffer.
    assert reports == [(100, 0), (300, 2), (500, 4), (700, 6), (900, 8)]


def test_a_control_message_without_header_or_payload_travels(pipes) -> None:
    backend, frontend = pipes
    sender = send_on_thread(frontend, Message(Kind.BYE))
    received = backend.recv(Limits(REQUESTS, 0, 0), TIMEOUT, TIMEOUT, zeros)
    sender.join(TIMEOUT.total_seconds())
    assert (received.kind, received.header, received.payload) == (Kind.BYE, b"", None)


def test_a_flat_payload_travels_as_one_piece(pipes) -> None:
    backend, frontend = pipes
    payload = torch.arange(256, dtype=torch.uint8).repeat(5)
    sender = send_on_thread(backend, Message(Kind.MODEL, b'{"version":3}', payload))
    received = frontend.recv(Limits(REPLIES, 64, payload.numel()), TIMEOUT, TIMEOUT, zeros)
    sender.join(TIMEOUT.total_seconds())
    assert torch.equal(received.payload, payload)


@pytest.mark.parametrize("room", [0, 1])
def test_a_payload_that_fits_after_the_control_block_travels_inside_it_and_a_larger_one_in_pieces(
        pipes, room) -> None:
    backend, frontend = pipes
    header = b'{"v":1}'
    control = 8 * 5 + 16 * 2 + len(header)  # the frame, a piece table of two rows, the header
    size = INLINE - control + room
    first, second = torch.full((100,), 3, dtype=torch.uint8), torch.arange(size - 400, dtype=torch.uint8)
    posted: List[torch.Tensor] = []
    post = frontend._post
    frontend._post = lambda send, tensor, what, *tag: posted.append(tensor) or post(send, tensor, what, *tag)
    sender = send_on_thread(frontend, Message(Kind.UPLOAD, header, Pieces(size, ((0, first), (400, second)))))
    received = backend.recv(Limits(REQUESTS, 64, INLINE), TIMEOUT, TIMEOUT, zeros)
    sender.join(TIMEOUT.total_seconds())
    assert torch.equal(received.payload[:100], first) and torch.equal(received.payload[400:], second)
    assert len(posted) == (1 if room == 0 else 3)  # one gloo message, or the control block and two pieces


@pytest.mark.parametrize("expects", [1, 2])
def test_after_expect_the_answer_and_the_message_after_it_arrive_in_order(pipes, expects) -> None:
    # expect() posts the receive of the answer's start before the request goes out (once, however
    # often it is called); recv() must take that receive and not post a second one, which would
    # leave the answer in the first.
    backend, frontend = pipes
    for _ in range(expects):
        frontend.expect()
    request = send_on_thread(frontend, Message(Kind.UPLOAD, b'{"n":1}'))
    assert backend.recv(Limits(REQUESTS, 64, 0), TIMEOUT, TIMEOUT, zeros).header == b'{"n":1}'
    request.join(TIMEOUT.total_seconds())
    backend.send(Message(Kind.ACK, b'{"answer":1}'), TIMEOUT)  # goes at once: its receive is posted
    answers = send_on_thread(backend, Message(Kind.ACK, b'{"answer":2}'))
    replies = Limits(REPLIES, 64, 0)
    assert frontend.recv(replies, TIMEOUT, TIMEOUT, zeros).header == b'{"answer":1}'
    assert frontend.recv(replies, TIMEOUT, TIMEOUT, zeros).header == b'{"answer":2}'
    answers.join(TIMEOUT.total_seconds())


def test_a_payload_expected_ahead_lands_whole_after_messages_without_payload(pipes) -> None:
    # The receive of the first piece is posted before any control message; a request without
    # payload comes first and must not disturb it, and the pieces after the first still land.
    backend, frontend = pipes
    buffer = zeros(INLINE * 8)
    backend.expect_payload(buffer)
    payload = torch.arange(INLINE * 3, dtype=torch.int64).to(torch.uint8)
    rows = ((0, payload[: INLINE * 2]), (INLINE * 2, payload[INLINE * 2:]))
    sender = send_on_thread(frontend, Message(Kind.DOWNLOAD, b'{"n":1}'))
    assert backend.recv(Limits(REQUESTS, 64, buffer.numel()), TIMEOUT, TIMEOUT, zeros).payload is None
    sender.join(TIMEOUT.total_seconds())
    sender = send_on_thread(frontend, Message(Kind.UPLOAD, b'{"n":2}', Pieces(payload.numel(), rows)))
    received = backend.recv(Limits(REQUESTS, 64, buffer.numel()), TIMEOUT, TIMEOUT, lambda n: buffer[:n])
    sender.join(TIMEOUT.total_seconds())
    assert torch.equal(received.payload, payload)


def test_a_piece_expected_ahead_is_moved_into_a_payload_buffer_of_other_memory(pipes) -> None:
    backend, frontend = pipes
    ahead = zeros(INLINE * 4)
    backend.expect_payload(ahead)
    payload = torch.arange(INLINE * 2, dtype=torch.int64).to(torch.uint8).flip(0)
    sender = send_on_thread(frontend, Message(Kind.UPLOAD, b'{}', Pieces(payload.numel(), ((0, payload),))))
    received = backend.recv(Limits(REQUESTS, 64, ahead.numel()), TIMEOUT, TIMEOUT, zeros)
    sender.join(TIMEOUT.total_seconds())
    assert received.payload.data_ptr() != ahead.data_ptr()
    assert torch.equal(received.payload, payload)


def test_an_inline_payload_leaves_the_receive_expected_ahead_for_the_next_payload(pipes) -> None:
    backend, frontend = pipes
    buffer = zeros(INLINE * 4)
    backend.expect_payload(buffer)
    small, large = torch.full((10,), 7, dtype=torch.uint8), torch.full((INLINE * 2,), 9, dtype=torch.uint8)
    limits = Limits(REQUESTS, 64, buffer.numel())
    for payload in (small, large):
        sender = send_on_thread(frontend, Message(Kind.UPLOAD, b'{}', payload))
        received = backend.recv(limits, TIMEOUT, TIMEOUT, zeros)
        sender.join(TIMEOUT.total_seconds())
        assert torch.equal(received.payload, payload)


def _loop_threads() -> int:
    """gloo's loop threads in this process (one per gloo device)."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                count += f.read().strip() == "gloo_tcp_loop"
        except OSError:
            pass
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_the_gloo_pipes_of_a_process_share_one_loop_thread() -> None:
    before = _loop_threads()
    opened: List[GlooPipe] = []
    try:
        for _ in range(3):
            opened.extend(open_pair())
        assert _loop_threads() - before <= 1  # six pipe sides, at most one new device
    finally:
        for pipe in opened:
            pipe.close()
