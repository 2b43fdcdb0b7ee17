"""How the benchmarks measure: CPU seconds of a process tree, load average, medians."""
from __future__ import annotations

import os

from actors.common.runtime import peak_rss_mb  # noqa: F401  (the benchmarks import it from here)


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def steal_seconds() -> float | None:
    """CPU-s the hypervisor gave to other guests, all cores (/proc/stat's steal): a virtual
    machine's speed drifts with it, so a benchmark shows it beside its wall times. None where not Linux."""
    try:
        with open("/proc/stat") as f:
            return int(f.readline().split()[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class CpuMeter:
    """CPU seconds used by this process and all its descendants (a local Ray's raylet, workers...) while
    active, sampled every `every` s so that processes which exit early still count up to their last sample;
    the sampling thread's own CPU is not counted."""

    def __init__(self, every: float = 0.5):
        import threading
        self.every, self.seen, self.stop, self.started = every, {}, threading.Event(), False
        self.own = 0.0  # CPU-s of the sampling thread, taken off this process's figure
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        import psutil
        me = psutil.Process()
        for p in [me] + me.children(recursive=True):
            try:
                t = p.cpu_times()
                first = t.user + t.system if not self.started else 0.0  # a new process counts from 0
                # The name is read each time: a Ray worker renames itself (ray::MapWorker(...)) once it runs.
                self.seen.setdefault(p.pid, [first, 0.0, ""])[1:] = [t.user + t.system,
                                                                     (p.cmdline() or [p.name()])[0][:48]]
            except psutil.Error:
                pass

    def _run(self):
        import time
        while not self.stop.wait(self.every):
            t = time.thread_time()
            self._sample()
            self.own += time.thread_time() - t

    def __enter__(self):
        self.steal0 = steal_seconds()
        self._sample()
        self.started = True
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._sample()
        # The sampling itself (psutil reads /proc for every process on the machine) is not the measured work:
        # 10-20% of a driver's CPU at 0.25-0.5 s on a busy machine, measured with py-spy.
        if os.getpid() in self.seen:
            self.seen[os.getpid()][1] -= self.own
        self.by_name = {}
        for first, last, name in self.seen.values():
            self.by_name[name] = self.by_name.get(name, 0.0) + max(0.0, last - first)
        self.seconds = sum(self.by_name.values())
        self.processes = len(self.seen)
        steal = steal_seconds()
        self.steal = None if steal is None or self.steal0 is None else round(steal - self.steal0, 2)


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")
