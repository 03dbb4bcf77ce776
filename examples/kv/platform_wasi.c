/*
 * kv - WASI preview1 I/O layer (colo-vm guest).
 *
 * fd 3 is the VM's listening socket, fd 4 the VM's disk (may be absent).
 * Only these wasi_snapshot_preview1 calls are used here: sock_accept,
 * sock_recv, sock_send, fd_close, fd_fdstat_set_flags,
 * poll_oneoff (FD_READ / FD_WRITE subscriptions only, never a clock),
 * fd_filestat_get, fd_pread, fd_pwrite.
 */
#ifdef __wasi__

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wasi/api.h>

#include "kv.h"
#include "platform.h"

#define LISTEN_FD 3
#define DISK_FD 4

int plat_init(int argc, char **argv) {
    (void)argc;
    (void)argv;
    /* Best effort: with a nonblocking listener a spurious readiness cannot
     * block accept. Accept is only called after poll reported fd 3 ready. */
    (void)__wasi_fd_fdstat_set_flags(LISTEN_FD, __WASI_FDFLAGS_NONBLOCK);
    return 0;
}

int plat_listener(void) { return LISTEN_FD; }

int plat_accept(int *fd) {
    __wasi_fd_t nfd;
    __wasi_errno_t e = __wasi_sock_accept(LISTEN_FD, 0, &nfd);
    if (e == __WASI_ERRNO_AGAIN) return PLAT_AGAIN;
    if (e != 0) return PLAT_ERR;
    if (__wasi_fd_fdstat_set_flags(nfd, __WASI_FDFLAGS_NONBLOCK) != 0) {
        (void)__wasi_fd_close(nfd);
        return PLAT_ERR;
    }
    *fd = (int)nfd;
    return 0;
}

long plat_recv(int fd, void *buf, size_t len) {
    __wasi_iovec_t iov = {.buf = buf, .buf_len = len};
    __wasi_size_t n;
    __wasi_roflags_t flags;
    __wasi_errno_t e = __wasi_sock_recv((__wasi_fd_t)fd, &iov, 1, 0, &n, &flags);
    if (e == __WASI_ERRNO_AGAIN) return PLAT_AGAIN;
    if (e != 0) return PLAT_ERR;
    return (long)n;
}

long plat_send(int fd, const void *buf, size_t len) {
    __wasi_ciovec_t iov = {.buf = buf, .buf_len = len};
    __wasi_size_t n;
    __wasi_errno_t e = __wasi_sock_send((__wasi_fd_t)fd, &iov, 1, 0, &n);
    if (e == __WASI_ERRNO_AGAIN) return PLAT_AGAIN;
    if (e != 0) return PLAT_ERR;
    return (long)n;
}

void plat_close(int fd) { (void)__wasi_fd_close((__wasi_fd_t)fd); }

static __wasi_subscription_t *subs;
static __wasi_event_t *evs;
static int subs_cap;

int plat_poll(plat_pollent_t *ents, int n) {
    if (2 * n > subs_cap) {
        subs_cap = 2 * n + 64;
        subs = xrealloc(subs, sizeof(*subs) * (size_t)subs_cap);
        evs = xrealloc(evs, sizeof(*evs) * (size_t)subs_cap);
    }
    __wasi_size_t ns = 0;
    for (int i = 0; i < n; i++) {
        ents[i].readable = ents[i].writable = 0;
        if (ents[i].want_read) {
            __wasi_subscription_t *s = &subs[ns++];
            memset(s, 0, sizeof *s);
            s->userdata = (uint64_t)i << 1;
            s->u.tag = __WASI_EVENTTYPE_FD_READ;
            s->u.u.fd_read.file_descriptor = (__wasi_fd_t)ents[i].fd;
        }
        if (ents[i].want_write) {
            __wasi_subscription_t *s = &subs[ns++];
            memset(s, 0, sizeof *s);
            s->userdata = (uint64_t)i << 1 | 1;
            s->u.tag = __WASI_EVENTTYPE_FD_WRITE;
            s->u.u.fd_write.file_descriptor = (__wasi_fd_t)ents[i].fd;
        }
    }
    if (ns == 0) {
        fprintf(stderr, "kv: nothing to wait for\n");
        return -1;
    }
    __wasi_size_t got = 0;
    __wasi_errno_t e = __wasi_poll_oneoff(subs, evs, ns, &got);
    if (e != 0) {
        fprintf(stderr, "kv: poll_oneoff failed (errno %u)\n", (unsigned)e);
        return -1;
    }
    for (__wasi_size_t k = 0; k < got; k++) {
        uint64_t ud = evs[k].userdata;
        int i = (int)(ud >> 1);
        if (i < 0 || i >= n) continue;
        /* An error on the event is reported as readiness: the next recv/send
         * call returns the error and the connection is closed. */
        if (ud & 1) ents[i].writable = 1;
        else ents[i].readable = 1;
    }
    return 0;
}

int plat_disk_open(uint64_t *size) {
    __wasi_filestat_t st;
    __wasi_errno_t e = __wasi_fd_filestat_get(DISK_FD, &st);
    if (e == __WASI_ERRNO_BADF) return 0;
    if (e != 0) {
        fprintf(stderr, "kv: cannot stat the disk (fd %d): errno %u\n", DISK_FD, (unsigned)e);
        return -1;
    }
    *size = st.size;
    return 1;
}

int plat_disk_pread(void *buf, size_t len, uint64_t off) {
    char *p = buf;
    while (len) {
        __wasi_iovec_t iov = {.buf = (uint8_t *)p, .buf_len = len};
        __wasi_size_t n;
        if (__wasi_fd_pread(DISK_FD, &iov, 1, off, &n) != 0 || n == 0) return -1;
        p += n;
        len -= n;
        off += n;
    }
    return 0;
}

int plat_disk_pwrite(const void *buf, size_t len, uint64_t off) {
    const char *p = buf;
    while (len) {
        __wasi_ciovec_t iov = {.buf = (const uint8_t *)p, .buf_len = len};
        __wasi_size_t n;
        if (__wasi_fd_pwrite(DISK_FD, &iov, 1, off, &n) != 0 || n == 0) return -1;
        p += n;
        len -= n;
        off += n;
    }
    return 0;
}

#endif /* __wasi__ */
