"""Process memory as reports and benchmarks measure it: anonymous memory (RssAnon), not max RSS, which
memory-mapped weights inflate."""

from __future__ import annotations

import threading


def status_bytes(field: str, pid: int | str = "self") -> int | None:
    """A `/proc/<pid>/status` memory field (RssAnon, VmRSS, VmHWM, ...) in bytes; None off Linux or if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_anon_bytes(pid: int | str = "self") -> int | None:
    """Resident anonymous memory: heap and tensors, not file-backed pages such as mmapped weights."""
    return status_bytes("RssAnon", pid)


class PeakRssAnon:
    """Polls this process's RssAnon in a thread while the block runs: `start`, `peak`, and `extra` = peak - start.

    Works because torch ops and pyfuse's C++ op release the GIL while they compute. All three stay None
    where /proc is not available.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.start = self.peak = self.extra = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        now = rss_anon_bytes()
        if now is not None and (self.peak is None or now > self.peak):
            self.peak = now

    def __enter__(self) -> PeakRssAnon:
        self.start = self.peak = rss_anon_bytes()
        if self.start is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
        self._sample()
        if self.start is not None:
            self.extra = self.peak - self.start
