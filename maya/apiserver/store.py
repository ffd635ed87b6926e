"""The apiserver's durable state in SQLite: volumes, their processes, nodes, events.

Desired state only (what should run where); what is observed (modes, rates, liveness)
lives in memory (observed.py) and is rebuilt from agents and targets after a restart.
Every change that alters what some agent should run bumps the revision, which agents
long-poll on. All calls are synchronous and short, made from the event loop's thread,
so a request's changes inside `tx()` are never interleaved with another's.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS volumes (
    name TEXT PRIMARY KEY,
    uid TEXT NOT NULL,
    namespace TEXT NOT NULL,
    size INTEGER NOT NULL,
    replica_count INTEGER NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'active',
    created REAL NOT NULL,
    deleted_rev INTEGER
);
CREATE TABLE IF NOT EXISTS procs (
    id TEXT PRIMARY KEY,
    volume TEXT NOT NULL REFERENCES volumes(name),
    role TEXT NOT NULL,
    node TEXT NOT NULL,
    pool TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'active',
    created REAL NOT NULL,
    removed_rev INTEGER
);
CREATE INDEX IF NOT EXISTS procs_node ON procs(node);
CREATE INDEX IF NOT EXISTS procs_volume ON procs(volume);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    report TEXT NOT NULL,
    registered REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    volume TEXT NOT NULL,
    time REAL NOT NULL,
    type TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_volume ON events(volume);
"""

EVENTS_KEPT = 50


@dataclass
class VolumeRow:
    name: str
    uid: str
    namespace: str
    size: int
    replica_count: int
    spec: dict[str, Any]
    state: str
    created: float
    deleted_rev: int | None


@dataclass
class ProcRow:
    id: str
    volume: str
    role: str  # "replica" | "target"
    node: str
    pool: str
    state: str  # "active" | "removing"
    created: float
    removed_rev: int | None


@dataclass
class NodeRow:
    name: str
    report: dict[str, Any]
    registered: float
    last_seen: float


class Store:
    def __init__(self, path: Path | str) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        if str(path) != ":memory:":
            self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(_SCHEMA)
        self._depth = 0
        self.revision = 0
        with self.tx():
            self.cluster_id = self._meta("cluster_id") or self._set_meta(
                "cluster_id", str(uuid.uuid4())
            )
            self.revision = int(self._meta("revision") or 0)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def tx(self) -> Iterator[None]:
        """One transaction: everything in it happens, or nothing (no half-made volume)."""
        if self._depth:  # nested: part of the outer transaction
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._depth = 1
        rev = self.revision
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            self.revision = rev
            raise
        finally:
            self._depth = 0

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row["value"] if row else None

    def _set_meta(self, key: str, value: str) -> str:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))
        return value

    def bump(self) -> int:
        """Next revision (inside a transaction): agents' assignments changed."""
        self.revision += 1
        self._set_meta("revision", str(self.revision))
        return self.revision

    # --- volumes ------------------------------------------------------------------------

    @staticmethod
    def _volume(row: sqlite3.Row) -> VolumeRow:
        return VolumeRow(
            row["name"],
            row["uid"],
            row["namespace"],
            row["size"],
            row["replica_count"],
            json.loads(row["spec"]),
            row["state"],
            row["created"],
            row["deleted_rev"],
        )

    def volume(self, name: str) -> VolumeRow | None:
        row = self.db.execute("SELECT * FROM volumes WHERE name=?", (name,)).fetchone()
        return self._volume(row) if row else None

    def volumes(self) -> list[VolumeRow]:
        rows = self.db.execute("SELECT * FROM volumes ORDER BY name").fetchall()
        return [self._volume(r) for r in rows]

    def add_volume(
        self, name: str, namespace: str, size: int, replica_count: int, spec: dict[str, Any]
    ) -> VolumeRow:
        now = time.time()
        uid = str(uuid.uuid4())
        self.db.execute(
            "INSERT INTO volumes(name, uid, namespace, size, replica_count, spec, created)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (name, uid, namespace, size, replica_count, json.dumps(spec), now),
        )
        return VolumeRow(name, uid, namespace, size, replica_count, spec, "active", now, None)

    def set_volume(self, name: str, **changes: Any) -> None:
        for key, value in changes.items():
            assert key in ("size", "spec", "state", "deleted_rev")
            if key == "spec":
                value = json.dumps(value)
            self.db.execute(f"UPDATE volumes SET {key}=? WHERE name=?", (value, name))

    def delete_volume(self, name: str) -> None:
        self.db.execute("DELETE FROM procs WHERE volume=?", (name,))
        self.db.execute("DELETE FROM events WHERE volume=?", (name,))
        self.db.execute("DELETE FROM volumes WHERE name=?", (name,))

    # --- processes ----------------------------------------------------------------------

    def procs(
        self,
        volume: str | None = None,
        node: str | None = None,
        state: str | None = None,
        role: str | None = None,
    ) -> list[ProcRow]:
        where, args = [], []
        for col, val in (("volume", volume), ("node", node), ("state", state), ("role", role)):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        sql = "SELECT * FROM procs" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self.db.execute(sql + " ORDER BY created, id", args).fetchall()
        return [ProcRow(**dict(r)) for r in rows]

    def add_proc(self, volume: str, role: str, node: str, pool: str) -> ProcRow:
        pid = ("r-" if role == "replica" else "t-") + uuid.uuid4().hex[:10]
        now = time.time()
        self.db.execute(
            "INSERT INTO procs(id, volume, role, node, pool, created) VALUES (?, ?, ?, ?, ?, ?)",
            (pid, volume, role, node, pool, now),
        )
        return ProcRow(pid, volume, role, node, pool, "active", now, None)

    def remove_proc(self, proc_id: str, rev: int) -> None:
        self.db.execute(
            "UPDATE procs SET state='removing', removed_rev=? WHERE id=?", (rev, proc_id)
        )

    def delete_proc(self, proc_id: str) -> None:
        self.db.execute("DELETE FROM procs WHERE id=?", (proc_id,))

    # --- nodes --------------------------------------------------------------------------

    def node(self, name: str) -> NodeRow | None:
        row = self.db.execute("SELECT * FROM nodes WHERE name=?", (name,)).fetchone()
        return self._node(row) if row else None

    @staticmethod
    def _node(row: sqlite3.Row) -> NodeRow:
        return NodeRow(row["name"], json.loads(row["report"]), row["registered"], row["last_seen"])

    def nodes(self) -> list[NodeRow]:
        return [self._node(r) for r in self.db.execute("SELECT * FROM nodes ORDER BY name")]

    def put_node(self, name: str, report: dict[str, Any]) -> bool:
        """Store an agent's report; True when the node is new."""
        now = time.time()
        cur = self.db.execute(
            "UPDATE nodes SET report=?, last_seen=? WHERE name=?", (json.dumps(report), now, name)
        )
        if cur.rowcount:
            return False
        self.db.execute(
            "INSERT INTO nodes(name, report, registered, last_seen) VALUES (?, ?, ?, ?)",
            (name, json.dumps(report), now, now),
        )
        return True

    def delete_node(self, name: str) -> None:
        self.db.execute("DELETE FROM nodes WHERE name=?", (name,))

    # --- events -------------------------------------------------------------------------

    def add_event(self, volume: str, kind: str, message: str) -> None:
        self.db.execute(
            "INSERT INTO events(volume, time, type, message) VALUES (?, ?, ?, ?)",
            (volume, time.time(), kind, message),
        )
        self.db.execute(
            "DELETE FROM events WHERE volume=? AND id NOT IN "
            "(SELECT id FROM events WHERE volume=? ORDER BY id DESC LIMIT ?)",
            (volume, volume, EVENTS_KEPT),
        )

    def events(self, volume: str, limit: int = 10) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT time, type, message FROM events WHERE volume=? ORDER BY id DESC LIMIT ?",
            (volume, limit),
        ).fetchall()
        return [dict(r) for r in reversed(rows)]
