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


# --- I/O faults: delay, fail, hang a request; drop its connection; crash -------------------
#
# Named `replica.<op>` (e.g. replica.write) or `replica.*` for every data op. Off unless set
# through the environment (TANDEM_FAULTS="replica.write=delay:0.5,replica.read=fail:5") or the
# replica's debug API (`--debug-api`). Unset, the check per request is one dict truthiness.

FAULTS_ENV = "TANDEM_FAULTS"
ACTIONS = ("delay", "fail", "hang", "drop", "crash")


class Fault:
    def __init__(self, action: str, arg: float = 0.0, count: int | None = None) -> None:
        if action not in ACTIONS:
            raise ValueError(f"unknown fault action {action!r}; one of {', '.join(ACTIONS)}")
        if action in ("delay", "fail") and arg <= 0:
            raise ValueError(f"fault {action} needs a positive argument")
        self.action, self.arg, self.remaining = action, arg, count

    def as_dict(self) -> dict[str, object]:
        return {"action": self.action, "arg": self.arg, "remaining": self.remaining}


_faults: dict[str, Fault] = {}


def set_fault(name: str, action: str, arg: float = 0.0, count: int | None = None) -> None:
    _faults[name] = Fault(action, arg, count)


def clear_faults(name: str | None = None) -> None:
    if name is None:
        _faults.clear()
    else:
        _faults.pop(name, None)


def active_faults() -> dict[str, dict[str, object]]:
    return {n: f.as_dict() for n, f in _faults.items()}


def io_fault(area: str, op: str) -> Fault | None:
    """The fault armed for `area.op` (or `area.*`), consuming one use of it."""
    if not _faults:
        return None
    f = _faults.get(f"{area}.{op}") or _faults.get(f"{area}.*")
    if f is None:
        return None
    if f.remaining is not None:
        f.remaining -= 1
        if f.remaining <= 0:
            for k, v in list(_faults.items()):
                if v is f:
                    del _faults[k]
    if f.action == "crash":
        os._exit(CRASH_EXIT)
    return f


def load_env_faults() -> None:
    """Arm the faults the environment names (parsed once, at process start)."""
    for item in filter(None, (x.strip() for x in os.environ.get(FAULTS_ENV, "").split(","))):
        name, _, spec = item.partition("=")
        action, _, arg = spec.partition(":")
        set_fault(name.strip(), action.strip(), float(arg) if arg else 0.0)
