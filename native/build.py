"""cffi builder (API mode, out of line) for Tandem's C hot path: `native._native`.

`python native/build.py --asan` builds the same sources with AddressSanitizer and UBSan as
`native._native_asan` (loaded instead when TANDEM_NATIVE=asan; see `make asan`).
"""

import re
import sys
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = [
    "crc32c.c",
    "uring_probe.c",
    "engine.c",
    "replica_server.c",
    "target.c",
    "nbd_server.c",
    "iscsi_server.c",
    "bench_client.c",
]
WARNINGS = ["-Wall", "-Wextra", "-Werror"]


def _cdef() -> str:
    """The declarations between the cffi markers of tandem.h: one source of truth."""
    text = (HERE / "tandem.h").read_text()
    m = re.search(r"/\* cffi:begin \*/(.*)/\* cffi:end \*/", text, re.S)
    assert m, "tandem.h lost its cffi markers"
    return m.group(1)


def make_builder(asan: bool = False, absolute: bool = False) -> FFI:
    ffi = FFI()
    ffi.cdef(_cdef())
    name = "native._native_asan" if asan else "native._native"
    cflags = ["-O2", "-std=gnu11", "-pthread", *WARNINGS]
    ldflags = ["-pthread"]
    if asan:
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
        cflags = [*cflags, *san, "-fno-sanitize-recover=undefined"]
        ldflags = [*ldflags, *san]
    # setuptools wants paths relative to the project root; a direct compile() runs elsewhere.
    src = [str(HERE / s) if absolute else f"native/{s}" for s in SOURCES]
    ffi.set_source(
        name,
        '#include "tandem.h"',
        sources=src,
        include_dirs=[str(HERE)],
        libraries=["uring"],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
    )
    return ffi


ffibuilder = make_builder()

if __name__ == "__main__":
    asan = "--asan" in sys.argv[1:]
    builder = make_builder(asan=asan, absolute=True)
    tmp = HERE.parent / "build" / ("asan" if asan else "native")
    tmp.mkdir(parents=True, exist_ok=True)
    out = builder.compile(tmpdir=str(tmp), verbose=True)
    # compile() leaves the module under tmpdir/native/: put it next to the package under
    # the abi3 name setuptools uses (cffi modules use the limited API), replacing that one.
    built = Path(out)
    dest = HERE / (built.name.split(".")[0] + ".abi3.so")
    tmp_dest = dest.with_suffix(".tmp")
    tmp_dest.write_bytes(built.read_bytes())
    tmp_dest.chmod(0o755)
    tmp_dest.replace(dest)
    print(dest)
