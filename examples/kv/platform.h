/*
 * kv - the I/O layer. Two implementations:
 *   platform_wasi.c  (__wasi__):  raw WASI preview1 calls; listening socket fd 3, disk fd 4
 *   platform_posix.c (otherwise): TCP listener and a disk image file, for native testing
 */
#ifndef KV_PLATFORM_H
#define KV_PLATFORM_H

#include <stddef.h>
#include <stdint.h>

enum {
    PLAT_AGAIN = -1, /* would block */
    PLAT_ERR = -2,   /* connection broken (or other error): close it */
};

/* Parses the platform's arguments and sets up the listener. 0 ok, -1 error (printed). */
int plat_init(int argc, char **argv);

/* Listener fd, for polling. */
int plat_listener(void);
/* Accepts one connection and makes it nonblocking. 0 ok, PLAT_AGAIN, PLAT_ERR. */
int plat_accept(int *fd);
/* > 0 bytes received, 0 = peer closed, PLAT_AGAIN, PLAT_ERR. */
long plat_recv(int fd, void *buf, size_t len);
/* >= 0 bytes sent, PLAT_AGAIN, PLAT_ERR. */
long plat_send(int fd, const void *buf, size_t len);
void plat_close(int fd);

typedef struct {
    int fd;
    uint8_t want_read, want_write;  /* in */
    uint8_t readable, writable;     /* out (readable includes EOF / hang-up / error) */
} plat_pollent_t;

/* Blocks (no timeout) until at least one entry is ready. Returns 0, or -1 on a
 * fatal error (printed). */
int plat_poll(plat_pollent_t *ents, int n);

/* Disk. open: 1 present (*size set), 0 absent, -1 error (printed). */
int plat_disk_open(uint64_t *size);
/* Whole-buffer positional I/O: 0 ok, -1 error. */
int plat_disk_pread(void *buf, size_t len, uint64_t off);
int plat_disk_pwrite(const void *buf, size_t len, uint64_t off);

#endif
