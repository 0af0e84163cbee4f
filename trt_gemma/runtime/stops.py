"""Stop strings: the request's `stop` value as a list, and a streaming matcher that cuts the text before the first one.

Shared by the scheduler (which cuts each generation's text deltas) and the API/server (which parse `stop`)."""
from __future__ import annotations


def stop_list(stop) -> list[str]:
    return [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]


def _failure(s: str) -> list[int]:
    """Knuth-Morris-Pratt failure table: f[k] = length of the longest proper prefix of s[:k+1] that is also its
    suffix."""
    f, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f


class StopMatcher:
    """Streaming stop-string search, linear in the text generated.

    One Knuth-Morris-Pratt automaton per stop string; its state is the length of the longest prefix of that stop
    string the text so far ends with. Text that could still become a stop string (the largest state) is withheld; at
    the first character where a stop string completes, the text is cut before it (before the longest one, if several
    end there), whatever way the text was split into pushes. Each character costs O(1) amortized per stop string.
    (The previous matcher compared every prefix of every stop string at each token: quadratic in the stop string's
    length, and a 1 MB stop string froze the event loop for 30 s.)"""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self._fail = [_failure(s) for s in stops]
        self._state = [0] * len(stops)
        self._held = ""  # the last max(state) characters: not emitted yet

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, stopped)."""
        if not self.stops:
            return text, False
        buf, base = self._held + text, len(self._held)
        for i, ch in enumerate(text):
            cut = None
            for j, (s, fail) in enumerate(zip(self.stops, self._fail)):
                k = self._state[j]
                while k and s[k] != ch:
                    k = fail[k - 1]
                if s[k] == ch:
                    k += 1
                if k == len(s):
                    start = base + i + 1 - k
                    cut = start if cut is None else min(cut, start)
                self._state[j] = k
            if cut is not None:
                self._held, self._state = "", [0] * len(self.stops)
                return buf[:cut], True
        keep = max(self._state)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out
