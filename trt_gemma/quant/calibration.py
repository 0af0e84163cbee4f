"""How ModelOpt calibration runs on a host: how many torch threads, and its progress (a determinate bar with an
ETA on a terminal, one line every few seconds otherwise).

Threads: torch's default is one thread per core. On a small host that already runs other work, that oversubscribes
the cores, and calibration ran 5-10x slower than with one thread (same output). `choose_threads` takes the cores
this process may run on (CPU affinity, a cgroup CPU quota) minus the 1-minute load average (work already running).

Progress: ModelOpt calls our forward loop once per calibration pass: INT4-AWQ (awq_lite) twice (activation
statistics, then the per-layer alpha search, which re-runs every linear for each candidate scale), FP8 (max
calibration) once. A forward of each pass costs a different, roughly fixed multiple of a plain forward
(`PASS_COST`, measured by benchmarks/calibration_estimate.py). The ETA weights the forwards left by those costs
and scales them by the time measured so far, so it corrects itself as calibration runs.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

from trt_gemma.errors import ConfigError

# Seconds of one calibration forward in each pass, relative to the first pass's (benchmarks/calibration_estimate.py).
PASS_COST = {"int4_awq": (1.0, 9.0), "fp8": (1.0,)}
LINE_EVERY_S = 5.0  # a progress line at most this often when stderr is not a terminal


def available_cores(root: Path = Path("/")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = (root / "sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def check_threads(requested: int | None) -> None:
    """--threads, checked before any work (quantize) and again where it is used."""
    if requested is not None and requested < 1:
        raise ConfigError(f"--threads {requested}: need at least 1", fix="use --threads 1 or more, or leave it out")


def choose_threads(requested: int | None = None, cores: int | None = None,
                   load: float | None = None) -> tuple[int, str]:
    """(threads, why): `requested` when given, else the available cores not already busy."""
    check_threads(requested)
    if requested is not None:
        return requested, f"{requested} thread{'s' * (requested > 1)} (--threads)"
    cores = available_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    n = max(1, min(cores, math.floor(cores - load + 0.5)))
    return n, f"{n} thread{'s' * (n > 1)} ({cores} cores available, load {load:.1f}; --threads to override)"


class torch_threads:
    """Set torch's intra-op thread count for a block, restoring it after."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        import torch

        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.previous)


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def seconds_left(times: list[tuple[int, float]], costs: list[float], n: int) -> float:
    """Seconds for the forwards not yet in `times` ((pass, seconds) per forward done; n forwards per pass): each at
    its pass's measured mean when that pass has started, else at the first pass's mean x the pass's relative cost.
    The very first forward pays one-off setup (about 2x a steady one), so it is left out once others exist."""
    steady = times[1:] if len(times) > 1 else times
    by_pass: dict[int, list[float]] = {}
    for p, s in steady:
        by_pass.setdefault(p, []).append(s)
    mean = {p: sum(v) / len(v) for p, v in by_pass.items()}
    unit = mean[min(mean)] / costs[min(mean)]  # seconds per unit of PASS_COST, from the earliest measured pass
    total = len(costs) * n
    return sum(mean.get(i // n, unit * costs[i // n]) for i in range(len(times), total))


class CalibrationProgress:
    """Counts calibration forwards across ModelOpt's passes; `step()` after each. On a terminal: a rich bar with
    forwards done/total and our ETA; otherwise a line every LINE_EVERY_S seconds and at each pass's end. The first
    forward's time gives the up-front estimate (logged once)."""

    def __init__(self, quant: str, samples: int, log, show: bool = True, interactive: bool | None = None,
                 clock=time.monotonic):
        self.quant, self.n, self.log, self.show, self.clock = quant, samples, log, show, clock
        self.costs = list(PASS_COST[quant])
        self.done = 0
        self.times: list[tuple[int, float]] = []  # (pass index, seconds) per forward
        if interactive is None:
            from trt_gemma.console import err_console

            interactive = err_console.is_terminal
        self.interactive = interactive
        self._bar = self._task = None
        self._last_line = 0.0

    @property
    def total(self) -> int:
        return len(self.costs) * self.n

    def __enter__(self):
        if self.show and self.interactive:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            from trt_gemma.console import err_console

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[eta]}"), console=err_console, transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(f"calibrating {self.quant}", total=self.total, eta="")
        self.t0 = self._t = self._last_line = self.clock()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self.show and exc[0] is None:
            self.log(f"calibrating {self.quant}: {self.done}/{self.total} forwards done in "
                     f"{_seconds(self.clock() - self.t0)}")

    def pass_of(self, i: int) -> int:
        return i // self.n

    def eta(self) -> float | None:
        return seconds_left(self.times, self.costs, self.n) if self.times else None

    def step(self) -> None:
        now = self.clock()
        if self.done >= self.total:  # ModelOpt ran one pass more than PASS_COST knows: grow, never overrun
            self.costs.append(self.costs[-1])
        p = self.pass_of(self.done)
        self.times.append((p, now - self._t))
        self._t = now
        self.done += 1
        eta = self.eta() or 0.0
        if self.done == min(2, self.total):  # the first forward pays one-off setup: estimate from the second
            self.log(f"calibration: {self.total} forwards in {len(self.costs)} pass{'es' * (len(self.costs) > 1)}, "
                     f"estimated {_seconds(now - self.t0 + eta)} (one forward {self.times[-1][1]:.2f} s)")
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, total=self.total,
                             description=f"calibrating {self.quant} (pass {p + 1}/{len(self.costs)})",
                             eta=f"~{_seconds(eta)} left" if self.done < self.total else "")
        elif self.show and self.done < self.total and (now - self._last_line >= LINE_EVERY_S
                                                        or self.done % self.n == 0):
            self._last_line = now
            self.log(f"calibrating {self.quant}: {self.done}/{self.total} forwards (pass {p + 1}/{len(self.costs)}), "
                     f"{_seconds(now - self.t0)} elapsed, ~{_seconds(eta)} left")
