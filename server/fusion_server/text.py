"""Streaming text assembly: token bytes in, safe UTF-8 text deltas out.

Contract: the router pushes the exact bytes of each chosen token; ``push`` returns
only text that can never change any more:

- deltas are whole characters: an incomplete multi-byte UTF-8 tail is held until it
  completes; bytes that can never become valid UTF-8 come out as U+FFFD at once;
- stop strings are matched on the decoded text, also across token boundaries; the
  output ends right before the first occurrence of any of them (the stop string is
  not included) and ``stopped`` turns True;
- text that could still be the start of a stop string is held back until it cannot,
  so nothing that follows a stop is ever emitted. After a stop, ``push`` returns "".

``finish`` flushes what is held at the end of generation (an incomplete UTF-8 tail
is decoded with errors="replace"). It knows nothing about tokens or vocabularies.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextAssembler:
    """Accumulates one request's output bytes and yields safe text deltas."""

    def __init__(self, stop: Sequence[str] = ()):
        if isinstance(stop, str):
            stop = (stop,)
        if any(not s for s in stop):
            raise ValueError("stop: stop strings must be non-empty")
        self._stops = tuple(stop)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""  # decoded text that might be the start of a stop string
        self._finished = False
        self.stopped = False  # a stop string was found
        self.text = ""  # all text emitted so far

    def push(self, data: bytes) -> str:
        """Append one token's bytes; return the newly safe text delta."""
        if self._finished:
            raise RuntimeError("push after finish")
        if self.stopped:
            return ""
        return self._emit(self._held + self._decoder.decode(bytes(data)), final=False)

    def finish(self) -> str:
        """Flush everything held; the stream is over."""
        if self._finished or self.stopped:
            self._finished = True
            return ""
        self._finished = True
        return self._emit(self._held + self._decoder.decode(b"", final=True), final=True)

    def _emit(self, pending: str, final: bool) -> str:
        cut = self._first_stop(pending)
        if cut is not None:
            self.stopped = True
            delta, self._held = pending[:cut], ""
        else:
            hold = 0 if final else self._stop_prefix_len(pending)
            delta, self._held = pending[: len(pending) - hold], pending[len(pending) - hold :]
        self.text += delta
        return delta

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
