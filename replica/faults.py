"""Named fault-injection points.

Code calls `crash_point("area.step")` where a crash would hurt (between the steps of a
crash-safe update); unarmed, that is a dict lookup. `TANDEM_CRASH_AT=name1,name2` in the
environment makes the process die there with `os._exit(137)`: no cleanup, no buffered output,
like SIGKILL, so real-process tests see exactly what a crash leaves on disk. Tests in-process
arm a point with a callable instead (usually one that raises).
"""

from __future__ import annotations

import os
from collections.abc import Callable

ENV = "TANDEM_CRASH_AT"
CRASH_EXIT = 137  # what a SIGKILLed process reports (128 + 9)

_armed: dict[str, Callable[[], object]] = {}
_env_raw: str | None = None
_env_points: frozenset[str] = frozenset()


def _env_armed() -> frozenset[str]:
    # Read at call time (tests set the variable late) but parse once per distinct value.
    global _env_raw, _env_points
    raw = os.environ.get(ENV, "")
    if raw != _env_raw:
        _env_points = frozenset(n.strip() for n in raw.split(",") if n.strip())
        _env_raw = raw
    return _env_points


def crash_point(name: str) -> None:
    """Run the action armed at `name`, die if the environment arms it, else do nothing."""
    action = _armed.get(name)
    if action is not None:
        action()
    elif name in _env_armed():
        os._exit(CRASH_EXIT)


def arm(name: str, action: Callable[[], object]) -> None:
    _armed[name] = action


def disarm(name: str) -> None:
    _armed.pop(name, None)


def disarm_all() -> None:
    _armed.clear()
