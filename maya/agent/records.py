"""What an agent runs, on disk, so a restarted agent re-adopts its running processes.

One JSON file per process (written to a temp file, fsynced, renamed): its assignment,
the ports it was given (kept across restarts, so its address stays the same), its data
directory, and the pid, start time and command line of the running process (to recognise
it, not a new process that reused the pid).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ProcRecord:
    id: str
    volume: str
    role: str  # "replica" | "target"
    cluster_id: str
    spec: dict[str, Any]
    ports: dict[str, int]
    log: str
    data_dir: str | None = None
    pid: int | None = None
    start_ticks: int | None = None
    argv: list[str] = field(default_factory=list)
    restarts: int = 0


class RecordStore:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)  # assignments carry CHAP secrets

    def load(self) -> list[ProcRecord]:
        out = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                out.append(ProcRecord(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                path.rename(path.with_suffix(".bad"))  # keep it for a human, never crash
        return out

    def save(self, rec: ProcRecord) -> None:
        path = self.dir / f"{rec.id}.json"
        tmp = path.with_suffix(".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(asdict(rec), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def delete(self, rec: ProcRecord) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.dir / f"{rec.id}.json").unlink()
