"""The front end's own load signal: how late the event loop runs, and shedding when it runs too late.

A request that the engine has not seen yet is invisible to its queue-wait signal: it sits in the
socket, in the HTTP parser's turn on the event loop, or in a body still being read. When the loop is
saturated, every ready callback waits behind the others, so the lateness of a short periodic timer
is the wait a newly arrived request faces before the server even parses it (the event-loop lag of
node's ``toobusy``). :class:`LoopLagMonitor` measures it; auto triage adds it to the queue wait, and
the app can answer new predict requests ``503 Retry-After`` before reading their body while the lag
is over a bound, which costs far less than serving a request that will miss its deadline anyway.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

__all__ = ["LoopLagMonitor", "header_timeout_protocol"]


class LoopLagMonitor:
    """The event loop's lag: how late a timer of period ``interval_s`` fires, the max over ``window_s``.

    :meth:`lag_s` also counts the current tick's lateness, so a caller on a loop that is behind sees it
    at once rather than after the next tick.
    """

    def __init__(self, interval_s: float = 0.005, window_s: float = 0.25) -> None:
        if interval_s <= 0 or window_s < interval_s:
            raise ValueError("need interval_s > 0 and window_s >= interval_s")
        self.interval_s, self.window_s = interval_s, window_s
        self._samples: collections.deque[tuple[float, float]] = collections.deque()
        self._due: float | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="loop-lag-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task, self._due = None, None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            now = loop.time()
            self._samples.append((now, max(0.0, now - self._due)))
            while self._samples and self._samples[0][0] < now - self.window_s:
                self._samples.popleft()

    def lag_s(self) -> float:
        """The largest lag over the window, or the current tick's lateness if larger (0 when not started)."""
        if self._loop is None or self._due is None:
            return 0.0
        now = self._loop.time()
        late_now = max(0.0, now - self._due)
        recent = max((lag for t, lag in self._samples if t >= now - self.window_s), default=0.0)
        return max(recent, late_now)


def header_timeout_protocol(timeout_s: float):
    """uvicorn's HTTP protocol class with a limit on the time a request's head may take to arrive.

    uvicorn times out idle keep-alive connections but not a connection that trickles its request line
    and headers (slowloris): each would hold a socket and a parser for ever. This subclass closes a
    connection whose head is not complete ``timeout_s`` after it opened or after its request began.
    (Bodies are timed by the app's front door.) Pass it as ``uvicorn.run(..., http=...)``.
    """
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(timeout_s, self._head_too_slow)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
