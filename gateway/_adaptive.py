"""An adaptive concurrency limit: the number of calls an upstream gets at once follows
its latency, so an upstream that slows down under load is given less of it.

A static ``concurrency`` must be guessed, and is wrong as soon as the upstream scales,
shares its machine or degrades: too high, and calls queue inside the upstream, where
every one of them gets slower and deadlines pass; too low, and the gateway sheds calls
the upstream could have served. This is the gradient controller of Envoy's adaptive
concurrency filter:

* The upstream's *minimum latency* is measured with the limit held at its minimum
  (at start, then every ``MIN_LATENCY_EVERY_S`` plus a random part of it, up to
  ``MIN_LATENCY_JITTER``, so that workers and gateways started together do not all
  hold their calls to the upstream at the minimum at the same moment): the median
  latency of ``MIN_LATENCY_SAMPLES`` calls that started during the measurement, when
  the upstream had next to nothing else to do.
* Every ``INTERVAL_S`` with at least ``MIN_SAMPLES`` calls finished, their median
  latency is compared with it: ``gradient = clamp((1 + tolerance) * minimum latency /
  latency, 0.5, 2)``, and ``limit = limit * gradient + sqrt(limit * gradient)`` (the
  root is headroom, so that the limit probes upward while latency holds), kept between
  the policy's minimum and its ``concurrency``, which is the maximum.

The limit does not grow while the upstream is given less than half of it: nothing then
shows that it could take more.
"""

from __future__ import annotations

import math
import random
import statistics

__all__ = ["GradientLimit"]

_rng = random.Random()


class GradientLimit:
    """The limit of one upstream, updated from the latency of the calls it finishes."""

    #: Seconds between updates of the limit.
    INTERVAL_S = 0.25
    #: Calls that must finish in an interval for it to count.
    MIN_SAMPLES = 10
    #: Seconds between measurements of the minimum latency.
    MIN_LATENCY_EVERY_S = 60.0
    #: The most a measurement is put off past ``MIN_LATENCY_EVERY_S``, as a share of it
    #: (Envoy's ``jitter``, 15% by default there too).
    MIN_LATENCY_JITTER = 0.15
    #: Calls a measurement of the minimum latency takes.
    MIN_LATENCY_SAMPLES = 20

    def __init__(self, *, maximum: int, minimum: int, tolerance: float) -> None:
        self.maximum = maximum
        self.minimum = min(minimum, maximum)
        self.tolerance = tolerance
        self.limit = float(maximum)
        self.min_latency_s: float | None = None
        self._measuring_since: float | None = -math.inf  # measure before anything else
        self._measured: list[float] = []
        self._next_measurement = math.inf
        self._window: list[float] = []
        self._window_start: float | None = None
        self._peak_in_flight = 0

    def resize(self, *, maximum: int, minimum: int, tolerance: float) -> None:
        """A reload's new bounds; the limit reached so far is kept within them."""
        self.maximum = maximum
        self.minimum = min(minimum, maximum)
        self.tolerance = tolerance
        self.limit = min(max(self.limit, self.minimum), self.maximum)

    @property
    def slots(self) -> int:
        """Calls the upstream may be given at once now."""
        if self._measuring_since is not None:
            return self.minimum
        return max(self.minimum, min(self.maximum, int(self.limit)))

    def sample(self, latency_s: float, started: float, in_flight: int, now: float) -> int:
        """Record one call that finished (``started`` when it got its slot, with
        ``in_flight`` calls holding one then); the slots to apply from now on."""
        if self._measuring_since is not None:
            if started >= self._measuring_since:  # not one let in before the measurement
                self._measured.append(latency_s)
                if len(self._measured) >= self.MIN_LATENCY_SAMPLES:
                    self.min_latency_s = statistics.median(self._measured)
                    self._measuring_since = None
                    self._measured = []
                    self._next_measurement = now + self.MIN_LATENCY_EVERY_S * (
                        1 + _rng.uniform(0, self.MIN_LATENCY_JITTER))
                    self._window, self._window_start = [], now
            return self.slots
        if self._window_start is None:
            self._window_start = now
        self._window.append(latency_s)
        self._peak_in_flight = max(self._peak_in_flight, in_flight)
        if now - self._window_start >= self.INTERVAL_S and len(self._window) >= self.MIN_SAMPLES:
            self._update(statistics.median(self._window))
            self._window, self._window_start, self._peak_in_flight = [], now, 0
            if now >= self._next_measurement:
                self._measuring_since = now
        return self.slots

    def _update(self, latency_s: float) -> None:
        if self.min_latency_s is None or latency_s <= 0:
            return
        gradient = max(0.5, min(2.0, (1 + self.tolerance) * self.min_latency_s / latency_s))
        if gradient > 1 and self._peak_in_flight < self.limit / 2:
            return  # the upstream was not given enough to show it could take more
        limit = self.limit * gradient + math.sqrt(self.limit * gradient)
        self.limit = max(float(self.minimum), min(float(self.maximum), limit))
