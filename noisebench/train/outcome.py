"""How a run ends for the shell: signals become a recorded ``interrupted`` run, each status its own exit code.

Exit codes of ``noisebench`` (scripts and Slurm arrays read these, so a diverged run never reads as success):

====  ===========================================================================================================
0     every run ``ok`` (or a clean dry run)
1     an error before the run started (bad config, missing testbed): no record written
2     a dry run found problems
3     ``diverged`` (loss or reward NaN/inf; the partial curve is in the record)
4     ``failed`` (an exception during training or evaluation; the partial curve is in the record)
130   interrupted by SIGINT (Ctrl-C), 143 by SIGTERM (e.g. Slurm's time limit): record status ``interrupted``
====  ===========================================================================================================

A multirun goes on past diverged and failed runs, prints how many runs ended how, and exits 4 when any failed,
else 3 when any diverged. An interrupt stops the whole multirun (the current run's record is written first).
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections import Counter

log = logging.getLogger("noisebench")

EXIT_CODES = {"ok": 0, "diverged": 3, "failed": 4}


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: a KeyboardInterrupt (so no ``except Exception`` swallows it) that knows its signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupt_code(exc: BaseException) -> int:
    """128 + signal number, as a shell reports a process ended by that signal (130: SIGINT, 143: SIGTERM)."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def signal_name(exc: BaseException) -> str:
    return signal.Signals(getattr(exc, "signum", signal.SIGINT)).name


@contextlib.contextmanager
def interrupts_raise():
    """SIGINT and SIGTERM raise :class:`RunInterrupted` in the main thread while the block runs, so every ``finally``
    (temp folders, the record write) runs on a polite kill as on Ctrl-C. Restores the previous handlers after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise RunInterrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, prev in previous.items():
            signal.signal(s, prev)


class Tally:
    """Statuses of the runs this process launched (a multirun's jobs run here with Hydra's basic launcher)."""

    def __init__(self):
        self.runs: list[tuple[str, str]] = []

    def add(self, name: str, status: str) -> None:
        self.runs.append((name, status))

    def exit_code(self) -> int:
        statuses = {s for _, s in self.runs}
        return EXIT_CODES["failed"] if "failed" in statuses else EXIT_CODES.get(max(
            statuses, key=lambda s: EXIT_CODES.get(s, 0), default="ok"), 0)

    def summary(self) -> str:
        counts = Counter(s for _, s in self.runs)
        line = f"{len(self.runs)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        bad = [f"{name} ({s})" for name, s in self.runs if s != "ok"]
        return line + (f"; not ok: {', '.join(bad)}" if bad else "")


TALLY = Tally()
