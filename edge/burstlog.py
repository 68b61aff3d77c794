"""Log a recurring problem once per burst instead of once per message.

A misbehaving device can send thousands of bad payloads a second; logging each would fill
the journal and cost more CPU than the data. The first occurrence of each key is logged at once
with its detail; later ones within ``window_secs`` are only counted and summarised when the
window ends (on the next occurrence after it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class BurstLog:
    def __init__(
        self,
        logger: logging.Logger,
        window_secs: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._window = window_secs
        self._clock = clock
        self._since: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        """Log ``msg % args`` now, or count it if ``key`` was logged within the window."""
        now = self._clock()
        seen = self._since.get(key)
        if seen is not None and now - seen[0] < self._window:
            self._since[key] = (seen[0], seen[1] + 1)
            return
        if seen is not None and seen[1]:
            self._log.warning("%s: %d more in the last %.0f s", key, seen[1], now - seen[0])
        self._since[key] = (now, 0)
        self._log.warning(msg, *args)
