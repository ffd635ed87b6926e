/* Is io_uring usable here? Disabled by sysctl (kernel.io_uring_disabled) or blocked by a
 * seccomp profile (Docker's default), io_uring_queue_init fails and the pure-Python data
 * path is used instead. */
#include <liburing.h>
#include "tandem.h"

int tandem_uring_probe(void)
{
    struct io_uring ring;
    int rc = io_uring_queue_init(4, &ring, 0);
    if (rc < 0)
        return rc;
    io_uring_queue_exit(&ring);
    return 0;
}
