#ifndef TANDEM_H
#define TANDEM_H
#include <stddef.h>
#include <stdint.h>

/* CRC32C of buf, continuing from crc (0 to start). */
uint32_t tandem_crc32c(uint32_t crc, const void *buf, size_t len);
/* 1 when the SSE4.2 instruction is used. */
int tandem_crc32c_hw(void);
/* 0 when an io_uring can be set up here, else -errno. */
int tandem_uring_probe(void);

#endif
