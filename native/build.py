"""cffi builder (API mode, out of line) for Tandem's C hot path: `native._native`."""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
SOURCES = ["crc32c.c", "uring_probe.c"]

ffibuilder = FFI()
ffibuilder.cdef(
    """
    uint32_t tandem_crc32c(uint32_t crc, const void *buf, size_t len);
    int tandem_crc32c_hw(void);
    int tandem_uring_probe(void);
    """
)
ffibuilder.set_source(
    "native._native",
    '#include "tandem.h"',
    sources=[f"native/{s}" for s in SOURCES],
    include_dirs=[str(HERE)],
    libraries=["uring"],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
