/* A tiny pipelined client of the replica data protocol, for native/bench_replica.py: keeps
 * qd requests in flight on one connection so the server, not the client, is measured. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "tandem.h"

#define REQ_MAGIC 0x51444E54u
#define RESP_MAGIC 0x52444E54u

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static void put_req(uint8_t *p, uint8_t op, uint64_t tag, uint64_t off, uint32_t len,
                    uint32_t plen)
{
    uint32_t magic = REQ_MAGIC;
    uint8_t flags = 0;
    uint16_t res = 0;
    memcpy(p, &magic, 4);
    memcpy(p + 4, &op, 1);
    memcpy(p + 5, &flags, 1);
    memcpy(p + 6, &res, 2);
    memcpy(p + 8, &tag, 8);
    memcpy(p + 16, &off, 8);
    memcpy(p + 24, &len, 4);
    memcpy(p + 28, &plen, 4);
}

static int send_all(int fd, const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static int recv_all(int fd, uint8_t *p, size_t n)
{
    while (n) {
        ssize_t k = recv(fd, p, n, 0);
        if (k <= 0) {
            if (k < 0 && errno == EINTR)
                continue;
            return k < 0 ? -errno : -ECONNRESET;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

int tandem_bench_run(const char *host, int port, int write, uint32_t bs, int qd,
                     double seconds, uint64_t span, uint64_t epoch, uint64_t seed,
                     struct tandem_bench_result *out)
{
    memset(out, 0, sizeof(*out));
    if (qd < 1 || bs == 0 || span < bs)
        return -EINVAL;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    int rc = 0;
    uint8_t *sbuf = NULL, *rbuf = NULL;
    double *started = NULL;
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        rc = -EINVAL;
        goto out;
    }
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        rc = -errno;
        goto out;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    size_t rcap = 8u << 20;
    sbuf = malloc((size_t)qd * (32 + bs));
    rbuf = malloc(rcap);
    started = calloc((size_t)qd, sizeof(double));
    if (!sbuf || !rbuf || !started) {
        rc = -ENOMEM;
        goto out;
    }
    if (write) { /* OPEN with the replica's epoch: writes are refused otherwise */
        char js[64];
        int n = snprintf(js, sizeof(js), "{\"epoch\": %llu}", (unsigned long long)epoch);
        put_req(sbuf, 8, 0, 0, 0, (uint32_t)n);
        memcpy(sbuf + 32, js, (size_t)n);
        if ((rc = send_all(fd, sbuf, 32 + (size_t)n)))
            goto out;
        uint8_t h[24];
        if ((rc = recv_all(fd, h, 24)))
            goto out;
        uint32_t status, plen;
        memcpy(&status, h + 4, 4);
        memcpy(&plen, h + 16, 4);
        if (plen > rcap || (rc = recv_all(fd, rbuf, plen)))
            goto out;
        if (status) {
            rc = -(int)status;
            goto out;
        }
    }
    uint64_t rng = seed | 1, blocks = span / bs;
    for (size_t i = 0; i < (size_t)qd * (32 + bs); i++)
        sbuf[i] = (uint8_t)xorshift(&rng);
    int *free_slots = malloc((size_t)qd * sizeof(int));
    if (!free_slots) {
        rc = -ENOMEM;
        goto out;
    }
    int nfree = qd;
    for (int i = 0; i < qd; i++)
        free_slots[i] = qd - 1 - i;
    double t0 = now_s(), end = t0 + seconds;
    size_t rlen = 0;
    int inflight = 0;
    for (;;) {
        double now = now_s();
        size_t slen = 0;
        while (nfree && now < end) {
            int slot = free_slots[--nfree];
            uint64_t off = (xorshift(&rng) % blocks) * bs;
            uint8_t *p = sbuf + slen;
            put_req(p, write ? 2 : 1, (uint64_t)slot, off, bs, write ? bs : 0);
            slen += 32 + (write ? bs : 0);
            started[slot] = now;
            inflight++;
        }
        if (slen && (rc = send_all(fd, sbuf, slen)))
            break;
        if (!inflight)
            break;
        ssize_t k = recv(fd, rbuf + rlen, rcap - rlen, 0);
        if (k <= 0) {
            if (k < 0 && errno == EINTR)
                continue;
            rc = k < 0 ? -errno : -ECONNRESET;
            break;
        }
        rlen += (size_t)k;
        size_t pos = 0;
        now = now_s();
        while (rlen - pos >= 24) {
            uint32_t magic, status, plen;
            uint64_t tag;
            memcpy(&magic, rbuf + pos, 4);
            memcpy(&status, rbuf + pos + 4, 4);
            memcpy(&tag, rbuf + pos + 8, 8);
            memcpy(&plen, rbuf + pos + 16, 4);
            if (magic != RESP_MAGIC || tag >= (uint64_t)qd || plen > rcap / 2) {
                rc = -EPROTO;
                break;
            }
            if (rlen - pos < 24 + (size_t)plen)
                break;
            pos += 24 + plen;
            double lat = (now - started[tag]) * 1e6;
            out->lat_us_sum += lat;
            if (lat > out->lat_us_max)
                out->lat_us_max = lat;
            out->ops++;
            out->bytes += bs;
            if (status)
                out->errors++;
            free_slots[nfree++] = (int)tag;
            inflight--;
        }
        if (rc)
            break;
        memmove(rbuf, rbuf + pos, rlen - pos);
        rlen -= pos;
    }
    out->seconds = now_s() - t0;
    free(free_slots);
out:
    free(sbuf);
    free(rbuf);
    free(started);
    close(fd);
    return rc;
}
