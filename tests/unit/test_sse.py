"""The SSE framer: events cut at blank lines of either kind, wherever the upstream's pieces
split them, and every byte looked at once (no rescans: linear in the bytes received)."""

from __future__ import annotations

import json

from router.upstreams.sse import SSEFramer


def events(framer: SSEFramer, pieces: list[bytes]) -> list[bytes]:
    out = [e for p in pieces for batch in framer.feed(p) for e in batch]
    return out + framer.close()


def test_lf_events_in_one_piece() -> None:
    f = SSEFramer()
    assert f.feed(b"data: 1\n\ndata: 2\n\n") == [[b"data: 1", b"data: 2"]]
    assert f.close() == []


def test_crlf_events() -> None:
    f = SSEFramer()
    assert events(f, [b"data: 1\r\n\r\ndata: 2\r\n\r\n"]) == [b"data: 1", b"data: 2"]


def test_mixed_separators() -> None:
    stream = b"data: a\n\ndata: b\r\n\r\nevent: x\r\ndata: c\n\r\ndata: d\n\n"
    assert events(SSEFramer(), [stream]) == [b"data: a", b"data: b",
                                             b"event: x\r\ndata: c", b"data: d"]


def test_a_line_end_inside_an_event_does_not_end_it() -> None:
    assert events(SSEFramer(), [b"event: e\ndata: 1\n\n"]) == [b"event: e\ndata: 1"]


def test_separators_split_across_pieces_at_every_byte() -> None:
    stream = b"data: a\n\ndata: bb\r\n\r\ndata: ccc\n\r\ndata: [DONE]\n\n"
    want = [b"data: a", b"data: bb", b"data: ccc", b"data: [DONE]"]
    for cut in range(1, len(stream)):
        assert events(SSEFramer(), [stream[:cut], stream[cut:]]) == want, cut
    # and one byte a piece
    assert events(SSEFramer(), [stream[i:i + 1] for i in range(len(stream))]) == want


def test_an_event_completed_by_a_later_piece_comes_then() -> None:
    f = SSEFramer()
    assert f.feed(b"data: 1\n\ndata: 2") == [[b"data: 1"]]
    assert f.feed(b"2\r\n") == []
    assert f.feed(b"\r\n") == [[b"data: 22"]]


def test_trailing_partial_event_is_given_by_close() -> None:
    f = SSEFramer()
    assert f.feed(b"data: 1\n\ndata: tail") == [[b"data: 1"]]
    assert f.close() == [b"data: tail"]
    assert f.close() == []  # nothing twice


def test_blank_lines_alone_make_no_event() -> None:
    assert events(SSEFramer(), [b"\n\n\r\n\r\n", b"\n\ndata: x\n\n\n\n"]) == [b"data: x"]


def test_batches_are_capped() -> None:
    event = b"data: " + b"x" * 1000
    f = SSEFramer(batch_bytes=4096)
    batches = f.feed((event + b"\n\n") * 10)
    assert [len(b) for b in batches] == [5, 5]  # 5 events reach 4096 bytes
    assert all(e == event for b in batches for e in b)


def test_a_12_mb_piece_is_scanned_once() -> None:
    """The relay's slow-reader case: an engine hands over a finished generation at once."""
    piece = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "demo",
             "choices": [{"index": 0, "delta": {"content": "x" * 1000},
                          "finish_reason": None}]}
    one = b"data: " + json.dumps(piece).encode() + b"\n\n"
    n = 12_000
    blob = one * n + b"data: [DONE]\n\n"
    f = SSEFramer()
    batches = f.feed(blob)
    got = [e for b in batches for e in b]
    assert len(got) == n + 1 and got[-1] == b"data: [DONE]"
    assert all(sum(map(len, b)) < 64 * 1024 + len(one) for b in batches)
    assert f.scanned == len(blob)  # each byte searched once: linear, not quadratic
    # The same bytes in pieces that split events anywhere: still each byte once.
    f = SSEFramer()
    step = 65_537
    got = [e for i in range(0, len(blob), step) for b in f.feed(blob[i:i + step]) for e in b]
    assert len(got) == n + 1
    assert f.scanned == len(blob)
