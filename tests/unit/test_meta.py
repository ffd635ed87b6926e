"""Crash-safe metadata (replica/meta.py) and the fault-injection points (replica/faults.py)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from replica import faults
from replica.meta import (
    Layer,
    MetaError,
    ReplicaMeta,
    read_json,
    write_json_atomic,
)

ROOT = Path(__file__).resolve().parents[2]


class Crash(Exception):
    """Raised by an armed crash point: the process 'dies' there."""


def crash() -> None:
    raise Crash


@pytest.fixture(autouse=True)
def _disarm() -> Iterator[None]:
    faults.disarm_all()
    yield
    faults.disarm_all()


# --- faults ----------------------------------------------------------------------------------


def test_unarmed_point_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.crash_point("nowhere")


def test_armed_action_runs_until_disarmed() -> None:
    hits: list[int] = []
    faults.arm("p", lambda: hits.append(1))
    faults.crash_point("p")
    faults.crash_point("other")
    assert hits == [1]
    faults.disarm("p")
    faults.crash_point("p")
    assert hits == [1]
    faults.arm("p", crash)
    faults.arm("q", crash)
    with pytest.raises(Crash):
        faults.crash_point("q")
    faults.disarm_all()
    faults.crash_point("p")
    faults.crash_point("q")
    faults.disarm("never-armed")  # no error


def _run_point(name: str, env_value: str | None) -> int:
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    if env_value is not None:
        env[faults.ENV] = env_value
    code = f"from replica.faults import crash_point; crash_point({name!r}); print('survived')"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, timeout=30
    )
    assert (proc.returncode == 0) == (b"survived" in proc.stdout)
    return proc.returncode


def test_env_var_kills_the_process_at_the_named_point() -> None:
    assert _run_point("meta.after_rename", "x.y, meta.after_rename") == faults.CRASH_EXIT
    assert _run_point("meta.after_rename", "meta.after_tmp_write") == 0
    assert _run_point("meta.after_rename", None) == 0


def test_env_var_is_reread_when_it_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faults.ENV, "a,b")
    assert faults._env_armed() == {"a", "b"}
    monkeypatch.setenv(faults.ENV, " c ,,")
    assert faults._env_armed() == {"c"}
    monkeypatch.delenv(faults.ENV)
    assert faults._env_armed() == frozenset()


# --- write_json_atomic / read_json -------------------------------------------------------------


def test_roundtrip_and_no_temp_left(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    write_json_atomic(path, {"a": 1, "b": [1, 2]})
    write_json_atomic(path, {"a": 2})
    assert read_json(path) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_sync_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The temp file is fsynced before the rename, the directory after it."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_json_atomic(tmp_path / "m.json", {"x": 1})
    assert events == ["fsync file", "rename", "fsync dir"]


def test_crash_before_rename_keeps_old_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    write_json_atomic(path, {"v": "old"})
    faults.arm("meta.after_tmp_write", crash)
    with pytest.raises(Crash):
        write_json_atomic(path, {"v": "new" * 1000})
    tmp = tmp_path / "m.json.tmp"
    assert tmp.exists()  # what a crash leaves behind
    assert json.loads(path.read_text()) == {"v": "old"}
    assert read_json(path) == {"v": "old"}
    assert not tmp.exists()  # the stray temp file is removed at open


def test_crash_before_first_rename_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    faults.arm("meta.after_tmp_write", crash)
    with pytest.raises(Crash):
        write_json_atomic(path, {"v": 1})
    faults.disarm_all()
    with pytest.raises(FileNotFoundError):
        read_json(path)
    assert list(tmp_path.iterdir()) == []


def test_crash_after_rename_has_new_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    write_json_atomic(path, {"v": "old"})
    faults.arm("meta.after_rename", crash)
    with pytest.raises(Crash):
        write_json_atomic(path, {"v": "new"})
    assert read_json(path) == {"v": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_read_json_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text('{"a": 1')
    with pytest.raises(MetaError, match="not valid JSON"):
        read_json(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(MetaError, match="not valid JSON"):
        read_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(MetaError, match="expected a JSON object"):
        read_json(path)


# --- ReplicaMeta -----------------------------------------------------------------------------


def sample() -> ReplicaMeta:
    return ReplicaMeta(
        volume="vol1",
        size=1 << 20,
        uuid="5b0e3c8e-8a5c-4d5e-9f0a-1c2d3e4f5a6b",
        chain=[
            Layer(file="layer-000001.img", name="snap1", created=1.5),
            Layer(file="layer-000002.img", name=None, created=2.0),
        ],
        generation=3,
        epoch=7,
        dirty=True,
    )


def test_meta_defaults() -> None:
    m = ReplicaMeta(volume="v", size=4096, uuid="u", chain=[Layer("l.img", None, 0.0)])
    assert (m.format, m.block_size, m.generation, m.epoch, m.dirty) == (1, 4096, 0, 0, False)
    assert m.head.file == "l.img"


def test_meta_roundtrip_through_json(tmp_path: Path) -> None:
    m = sample()
    write_json_atomic(tmp_path / "volume.json", m.to_dict())
    back = ReplicaMeta.from_dict(read_json(tmp_path / "volume.json"))
    assert back == m
    assert back.head.name is None and back.chain[0].name == "snap1"


@pytest.mark.parametrize(
    "field",
    ["format", "volume", "size", "block_size", "uuid", "chain", "generation", "epoch", "dirty"],
)
def test_meta_missing_field(field: str) -> None:
    d = sample().to_dict()
    del d[field]
    with pytest.raises(MetaError, match=f"missing field '{field}'"):
        ReplicaMeta.from_dict(d)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("size", "1048576"),
        ("size", 1.0),
        ("epoch", True),  # a bool is not a number here
        ("generation", None),
        ("dirty", 1),  # nor a number a bool
        ("volume", 5),
        ("chain", {}),
    ],
)
def test_meta_wrong_type(field: str, value: Any) -> None:
    d = sample().to_dict()
    d[field] = value
    with pytest.raises(MetaError, match=f"field '{field}' must be"):
        ReplicaMeta.from_dict(d)


def _with_chain(chain: list[Any]) -> dict[str, Any]:
    d = sample().to_dict()
    d["chain"] = chain
    return d


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": 2}, "unsupported metadata format 2"),
        ({"size": 4095}, "not a positive multiple"),
        ({"size": 0}, "not a positive multiple"),
        ({"block_size": 3000}, "power of two"),
        ({"uuid": ""}, "uuid is empty"),
        ({"epoch": -1}, "must not be negative"),
    ],
)
def test_meta_invalid_values(change: dict[str, Any], message: str) -> None:
    d = sample().to_dict() | change
    with pytest.raises(MetaError, match=message):
        ReplicaMeta.from_dict(d)


@pytest.mark.parametrize(
    ("chain", "message"),
    [
        ([], "chain is empty"),
        ([{"file": "a.img", "name": "s", "created": 0}], "head and must have no name"),
        (
            [
                {"file": "a.img", "name": None, "created": 0},
                {"file": "b", "name": None, "created": 0},
            ],
            "has no snapshot name",
        ),
        (
            [
                {"file": "a", "name": "s", "created": 0},
                {"file": "b", "name": "s", "created": 0},
                {"file": "c", "name": None, "created": 0},
            ],
            "duplicate snapshot names",
        ),
        (
            [{"file": "a", "name": "s", "created": 0}, {"file": "a", "name": None, "created": 0}],
            "duplicate layer files",
        ),
        ([{"file": "../escape.img", "name": None, "created": 0}], "invalid layer file name"),
        ([{"file": "", "name": None, "created": 0}], "invalid layer file name"),
        (["layer.img"], r"chain\[0\]: expected an object"),
        ([{"file": "a", "name": None}], r"chain\[0\]: missing field 'created'"),
        ([{"file": "a", "name": 3, "created": 0}], "field 'name' must be str or null"),
    ],
)
def test_meta_invalid_chain(chain: list[Any], message: str) -> None:
    with pytest.raises(MetaError, match=message):
        ReplicaMeta.from_dict(_with_chain(chain))


def test_meta_not_an_object() -> None:
    with pytest.raises(MetaError, match="expected an object"):
        ReplicaMeta.from_dict([1])


def test_to_dict_refuses_invalid_meta() -> None:
    m = sample()
    m.chain[-1].name = "oops"
    with pytest.raises(MetaError):
        m.to_dict()


def test_meta_error_is_value_error() -> None:
    assert issubclass(MetaError, ValueError)
