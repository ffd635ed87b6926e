"""Thin wrapper over the C hot path (`native._native`, built by cffi from native/*.c).

Everything here has a pure-Python reference so Tandem still runs (slower) where the
extension could not be built; `AVAILABLE` says which one is in use. TANDEM_NATIVE=asan
loads the AddressSanitizer build (`make asan`) instead.
"""

from __future__ import annotations

import os

try:
    if os.environ.get("TANDEM_NATIVE") == "asan":
        from native._native_asan import ffi, lib
    else:
        from native._native import ffi, lib

    AVAILABLE = True
except ImportError:  # extension not built: fall back to the reference code
    ffi = lib = None
    AVAILABLE = False

_CRC_TABLE: list[int] = []


def _crc32c_py(crc: int, data: bytes) -> int:
    if not _CRC_TABLE:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
            _CRC_TABLE.append(c)
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ b) & 0xFF]
    return crc ^ 0xFFFFFFFF


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC32C (Castagnoli) of data, continuing from crc."""
    if lib is not None:
        return lib.tandem_crc32c(crc, ffi.from_buffer(data), len(data))
    return _crc32c_py(crc, bytes(data))


def uring_error() -> int:
    """0 when io_uring works on this host, else the negative errno that stopped it."""
    if lib is None:
        return -38  # ENOSYS: no engine built
    return lib.tandem_uring_probe()


def engine_unavailable() -> str | None:
    """Why the io_uring engine cannot run here (None when it can)."""
    if lib is None:
        return "the native extension is not built"
    if not hasattr(lib, "tandem_engine_new"):
        return "the native extension predates the engine (rebuild it: make setup)"
    err = uring_error()
    if err:
        return f"io_uring is unavailable here ({os.strerror(-err)})"
    return None


ENGINES = ("auto", "native", "python")


class EngineUnavailable(ValueError):
    """--engine native on a host where the io_uring engine cannot run."""


def choose_engine(requested: str) -> tuple[str, str]:
    """(engine, why): auto picks native where io_uring works and the extension is built."""
    if requested not in ENGINES:
        raise ValueError(f"unknown engine {requested!r}; one of {', '.join(ENGINES)}")
    if requested == "python":
        return "python", "asked for (--engine python)"
    why = engine_unavailable()
    if why is None:
        return "native", "io_uring works here" if requested == "auto" else "asked for"
    if requested == "native":
        raise EngineUnavailable(f"--engine native: {why}")
    return "python", why
