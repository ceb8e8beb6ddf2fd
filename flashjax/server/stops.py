"""Stop strings over streamed text: cut the text where one begins, and never split one across chunks.

A stop string can arrive in pieces ("\\n\\nUs" then "er:"), so text that could be the start of one is
held back until the next piece says whether it is; the client never sees half a stop string that the
full text would not contain.
"""

from __future__ import annotations


class StopMatcher:
    """Feed decoded pieces; get back what is safe to send. `stopped` once a stop string has appeared."""

    def __init__(self, stops: tuple[str, ...] = ()):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text that is safe to send now. When a stop string completes, the text before it is returned
        and everything from it on is dropped (OpenAI's rule: the stop string is not part of the output)."""
        if self.stopped:
            return ""
        buffer = self.held + text
        if not self.stops:
            self.held = ""
            return buffer
        found = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped, self.held = True, ""
            return buffer[:min(found)]
        keep = self._partial_suffix(buffer)
        self.held = buffer[len(buffer) - keep:]
        return buffer[:len(buffer) - keep]

    def flush(self) -> str:
        """At the end of generation: what was held back was not a stop string after all."""
        rest, self.held = self.held, ""
        return "" if self.stopped else rest

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest end of `buffer` that is the start (not the whole) of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buffer)), best, -1):
                if buffer.endswith(s[:k]):
                    best = k
                    break
        return best
