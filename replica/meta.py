"""Crash-safe JSON metadata of a replica.

Every change goes through `write_json_atomic`: write a temp file in the same directory, fsync
it, rename it over the target, fsync the directory. After a crash at any point the file holds
either the old or the new document, whole; a temp file left behind by an interrupted write is
garbage and `read_json` removes it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replica.faults import crash_point

FORMAT = 1
TMP_SUFFIX = ".tmp"


class MetaError(ValueError):
    """Metadata is missing a field, has a field of the wrong type, or is inconsistent."""


def _tmp_path(path: Path) -> Path:
    return path.with_name(path.name + TMP_SUFFIX)


def fsync_dir(directory: Path) -> None:
    """Make renames/creations/removals in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    """Replace `path` with `obj` as JSON so that a crash leaves the old or the new file, whole."""
    path = Path(path)
    tmp = _tmp_path(path)
    data = memoryview((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)  # the contents must be on disk before the rename can expose them
    finally:
        os.close(fd)
    crash_point("meta.after_tmp_write")
    os.replace(tmp, path)
    crash_point("meta.after_rename")
    fsync_dir(path.parent)  # the rename itself is only durable once the directory is


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object at `path` (MetaError if unparsable); removes a stray temp file first."""
    path = Path(path)
    try:
        _tmp_path(path).unlink()  # left by a write interrupted before its rename: never valid
    except FileNotFoundError:
        pass
    raw = path.read_bytes()
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MetaError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise MetaError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _field(d: dict[str, Any], key: str, types: tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise MetaError(f"{where}: missing field {key!r}")
    value = d[key]
    # bool is an int subclass: true/false must not pass for a number (nor 1 for a bool).
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise MetaError(f"{where}: field {key!r} must be {names}, got {value!r}")
    return value


@dataclass(slots=True)
class Layer:
    """One file of the chain: a read-only snapshot (`name` set) or the writable head (None)."""

    file: str
    name: str | None
    created: float

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "name": self.name, "created": self.created}

    @classmethod
    def from_dict(cls, d: Any, where: str = "layer") -> Layer:
        if not isinstance(d, dict):
            raise MetaError(f"{where}: expected an object, got {d!r}")
        return cls(
            file=_field(d, "file", (str,), where),
            name=_field(d, "name", (str, type(None)), where),
            created=float(_field(d, "created", (int, float), where)),
        )


@dataclass(kw_only=True, slots=True)
class ReplicaMeta:
    """Contents of a replica's volume.json. `chain` runs bottom..top; the last layer is the head."""

    format: int = FORMAT
    volume: str
    size: int
    block_size: int = 4096
    uuid: str
    chain: list[Layer]
    generation: int = 0
    epoch: int = 0
    dirty: bool = False
    # The kernel boot during which the replica was last opened for writing: a dirty replica
    # opened under another boot may have lost page-cache data (power loss, kernel crash),
    # not just its process.
    boot_id: str = ""

    @property
    def head(self) -> Layer:
        return self.chain[-1]

    def validate(self) -> None:
        """Raise MetaError unless the fields are mutually consistent."""
        if self.format != FORMAT:
            raise MetaError(
                f"unsupported metadata format {self.format} (this build reads {FORMAT})"
            )
        bs = self.block_size
        if bs <= 0 or bs & (bs - 1):
            raise MetaError(f"block_size {bs} is not a positive power of two")
        if self.size <= 0 or self.size % bs:
            raise MetaError(f"size {self.size} is not a positive multiple of block_size {bs}")
        if not self.uuid:
            raise MetaError("uuid is empty")
        if self.generation < 0 or self.epoch < 0:
            raise MetaError("generation and epoch must not be negative")
        if not self.chain:
            raise MetaError("chain is empty: a replica needs at least a head layer")
        if self.chain[-1].name is not None:
            raise MetaError("the last layer of the chain is the head and must have no name")
        names = [layer.name for layer in self.chain[:-1]]
        for i, name in enumerate(names):
            if not name:
                raise MetaError(f"chain[{i}] is below the head but has no snapshot name")
        if len(set(names)) != len(names):
            raise MetaError(f"duplicate snapshot names in chain: {names}")
        files = [layer.file for layer in self.chain]
        for f in files:
            # Layer files live in the replica directory: refuse anything that could escape it.
            if not f or f in (".", "..") or "/" in f or "\0" in f:
                raise MetaError(f"invalid layer file name {f!r}")
        if len(set(files)) != len(files):
            raise MetaError(f"duplicate layer files in chain: {files}")

    def to_dict(self) -> dict[str, Any]:
        self.validate()
        return {
            "format": self.format,
            "volume": self.volume,
            "size": self.size,
            "block_size": self.block_size,
            "uuid": self.uuid,
            "chain": [layer.to_dict() for layer in self.chain],
            "generation": self.generation,
            "epoch": self.epoch,
            "dirty": self.dirty,
            "boot_id": self.boot_id,
        }

    @classmethod
    def from_dict(cls, d: Any) -> ReplicaMeta:
        """Parse and validate; unknown keys are ignored (a later format bumps `format`)."""
        where = "replica metadata"
        if not isinstance(d, dict):
            raise MetaError(f"{where}: expected an object, got {type(d).__name__}")
        chain_raw = _field(d, "chain", (list,), where)
        meta = cls(
            format=_field(d, "format", (int,), where),
            volume=_field(d, "volume", (str,), where),
            size=_field(d, "size", (int,), where),
            block_size=_field(d, "block_size", (int,), where),
            uuid=_field(d, "uuid", (str,), where),
            chain=[Layer.from_dict(x, f"{where}: chain[{i}]") for i, x in enumerate(chain_raw)],
            generation=_field(d, "generation", (int,), where),
            epoch=_field(d, "epoch", (int,), where),
            dirty=_field(d, "dirty", (bool,), where),
            boot_id=str(d.get("boot_id", "")),  # absent in replicas made before it existed
        )
        try:
            meta.validate()
        except MetaError as e:
            raise MetaError(f"{where}: {e}") from None
        return meta
