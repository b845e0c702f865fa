"""Server-sent events framed from the upstream's byte stream, in time linear in its bytes.

An event ends at a blank line: "\\n\\n", "\\r\\n\\r\\n" or a mix of the two ("\\n\\r\\n"),
which may arrive split across the upstream's pieces. Under back-pressure (a caller that
reads slowly) the engine client hands over large pieces, megabytes holding thousands of
events; a framer that searched the whole remaining buffer for each event and copied the
rest after it cost O(n^2) for a piece of n bytes, which took a core for a few slow
streams. This one remembers how far it has looked and never looks at a byte twice.
"""

from __future__ import annotations

_LF = 0x0A
_CR = 0x0D


class SSEFramer:
    """Feed it the upstream's pieces; it returns whole events (the bytes between blank
    lines, stripped, without their separators) in batches of up to `batch_bytes` each, as
    many as the pieces completed. `scanned` counts the bytes searched for line ends, for
    tests that check the framer never goes back over a byte."""

    __slots__ = ("_batch_bytes", "_buf", "_pos", "scanned")

    def __init__(self, batch_bytes: int = 64 * 1024) -> None:
        self._batch_bytes = batch_bytes
        self._buf = bytearray()
        self._pos = 0  # where the next search for a line end starts
        self.scanned = 0

    def feed(self, piece: bytes) -> list[list[bytes]]:
        buf = self._buf
        buf += piece
        batches: list[list[bytes]] = []
        batch: list[bytes] = []
        size = 0
        start = 0  # the current event's first byte
        pos = self._pos
        limit = self._batch_bytes
        find = buf.find
        while (i := find(b"\n", pos)) >= 0:
            self.scanned += i + 1 - pos
            pos = i + 1
            # A blank line ends the event: this line end follows another one directly
            # (LF LF) or after a CR (LF CR LF, as in CRLF CRLF). Only bytes of the current
            # event count, so a separator's own bytes never end the next event.
            if i - 1 >= start and buf[i - 1] == _LF:
                end = i - 1
            elif i - 2 >= start and buf[i - 1] == _CR and buf[i - 2] == _LF:
                end = i - 2
            else:
                continue
            event = bytes(buf[start:end]).strip()
            start = pos
            if event:
                batch.append(event)
                size += len(event)
                if size >= limit:
                    batches.append(batch)
                    batch, size = [], 0
        self.scanned += len(buf) - pos
        if batch:
            batches.append(batch)
        # Consumed events leave the buffer once a piece, not once an event: deleting the
        # front of a bytearray is cheap, but copying the rest per event is what made the
        # old framer quadratic.
        if start:
            del buf[:start]
        self._pos = len(buf)
        return batches

    def close(self) -> list[bytes]:
        """What the upstream sent after its last blank line: an event without its
        separator (some servers end that way), or nothing."""
        tail = bytes(self._buf).strip()
        self._buf.clear()
        self._pos = 0
        return [tail] if tail else []
