"""`tandem replica|target serve --engine auto|native|python`: which engine, and why."""

from __future__ import annotations

import pytest

import native
from native import EngineUnavailable, choose_engine


def test_python_when_asked() -> None:
    assert choose_engine("python")[0] == "python"


def test_auto_and_native_where_the_engine_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "engine_unavailable", lambda: None)
    assert choose_engine("auto") == ("native", "io_uring works here")
    assert choose_engine("native")[0] == "native"


def test_auto_falls_back_and_native_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    why = "io_uring is unavailable here (Operation not permitted)"
    monkeypatch.setattr(native, "engine_unavailable", lambda: why)
    assert choose_engine("auto") == ("python", why)
    with pytest.raises(EngineUnavailable, match="Operation not permitted"):
        choose_engine("native")
    with pytest.raises(ValueError, match="unknown engine"):
        choose_engine("fast")


def test_engine_unavailable_reports_this_host() -> None:
    why = native.engine_unavailable()
    if native.AVAILABLE and native.uring_error() == 0:
        assert why is None
    else:
        assert why
