"""Supervised children: start (or adopt) a process, restart it with backoff when it exits.

Children run in their own sessions, so they outlive the agent: a restarted agent finds
them by pid, start time and command line (see records.py) and adopts them. Exits are
watched through a pidfd, which works for adopted processes too (they are not our
children, so their exit status is unknown: the log says why they stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from maya.agent.launch import PREFIX
from maya.agent.records import ProcRecord

log = logging.getLogger("tandem.agent")

BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0
STABLE_AFTER = 30.0  # a child that ran this long starts again from the first backoff


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot; None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def is_ours(rec: ProcRecord) -> bool:
    """The recorded process still runs (same pid, start time and command line)."""
    if rec.pid is None or rec.start_ticks is None:
        return False
    if start_ticks(rec.pid) != rec.start_ticks:
        return False
    argv = cmdline(rec.pid)
    return bool(rec.argv) and argv is not None and argv[-len(rec.argv) :] == rec.argv


async def wait_exit(pid: int, popen: subprocess.Popen[bytes] | None) -> int | None:
    """Until the process exits; its status if it is our child."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return popen.wait() if popen else None
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(fd, lambda: exited.done() or exited.set_result(None))
    try:
        await exited
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return popen.wait() if popen else None


def last_line(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = [x for x in f.read().decode(errors="replace").splitlines() if x.strip()]
    except OSError:
        return None
    return lines[-1].strip()[:500] if lines else None


class Child:
    """One supervised process."""

    def __init__(
        self,
        rec: ProcRecord,
        build: Callable[[ProcRecord], tuple[list[str], dict[str, str]]],
        save: Callable[[ProcRecord], None],
        on_change: Callable[[], None],
        host: str,
        main_port: int,
    ) -> None:
        self.rec = rec
        self._build, self._save, self._on_change = build, save, on_change
        self._host, self._port = host, main_port
        self.state = "stopped"
        self.error: str | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def active(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, adopt: bool = False) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._supervise(adopt))

    def _set(self, state: str, error: str | None = None) -> None:
        self.state = state
        if error is not None or state == "running":
            self.error = error
        self._on_change()

    def _spawn(self) -> None:
        argv, env = self._build(self.rec)
        logfile = Path(self.rec.log)
        logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(logfile, "ab") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting\n".encode())
            f.flush()
            self._popen = subprocess.Popen(
                [*PREFIX, *argv],
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                start_new_session=True,  # outlives the agent; no terminal signals
            )
        self.rec.pid = self._popen.pid
        self.rec.start_ticks = start_ticks(self._popen.pid)
        self.rec.argv = argv
        self._save(self.rec)

    async def _supervise(self, adopt: bool) -> None:
        backoff = BACKOFF_FIRST
        while not self._stopping:
            if adopt:
                adopt = False
                self._popen = None
                log.info("adopted %s %s (pid %s)", self.rec.role, self.rec.id, self.rec.pid)
            else:
                try:
                    self._spawn()
                except OSError as e:
                    self._set("backoff", f"cannot start: {e}")
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
            assert self.rec.pid is not None
            self._set("starting")
            ready = asyncio.create_task(self._wait_ready())
            started = time.monotonic()
            code = await wait_exit(self.rec.pid, self._popen)
            ready.cancel()
            if self._stopping:
                break
            why = last_line(Path(self.rec.log)) or "no output"
            status = f"status {code}" if code is not None else "exited"
            self.rec.restarts += 1
            self.rec.pid = None
            self._save(self.rec)
            if time.monotonic() - started > STABLE_AFTER:
                backoff = BACKOFF_FIRST
            log.warning(
                "%s %s %s (%s); restart in %.0fs", self.rec.role, self.rec.id, status, why, backoff
            )
            self._set("backoff", f"{status}: {why}")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _wait_ready(self) -> None:
        while True:
            try:
                _, writer = await asyncio.open_connection(self._host, self._port)
                writer.close()
                self._set("running")
                return
            except OSError:
                await asyncio.sleep(0.1)

    async def stop(self, timeout: float = 15.0) -> None:
        """Stop the process (SIGTERM, then SIGKILL) and its supervision."""
        self._stopping = True
        pid = self.rec.pid
        if pid is not None and self.running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                os.kill(pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(wait_exit(pid, self._popen), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                await wait_exit(pid, self._popen)
        await self.detach()
        self.rec.pid = None
        self.state = "stopped"

    async def detach(self) -> None:
        """Stop supervising, leave the process running (the agent is restarting)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def running(self) -> bool:
        if self._popen is not None and self._popen.pid == self.rec.pid:
            return self._popen.poll() is None
        return is_ours(self.rec)
