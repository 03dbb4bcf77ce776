/*
 * kv - POSIX I/O layer, for building and testing kv natively.
 *
 *   kv [-p PORT] [-b ADDR] [-d DISK_FILE] [-s DISK_SIZE]
 *
 * Environment fallbacks: KV_PORT (default 6379), KV_BIND (default 127.0.0.1),
 * KV_DISK (no default: memory only), KV_DISK_SIZE (size given to a new or
 * empty disk file; default 16M; suffixes K/M/G).
 * The disk file is treated like the VM's fixed-size disk: writes past its size
 * fail.
 */
#ifndef __wasi__

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kv.h"
#include "platform.h"

static int listen_fd = -1;
static const char *disk_path;
static uint64_t disk_new_size = 16u << 20;
static int disk_fd = -1;
static uint64_t disk_size;

static int parse_size(const char *s, uint64_t *out) {
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s) return -1;
    if (*end == 'k' || *end == 'K') { v <<= 10; end++; }
    else if (*end == 'm' || *end == 'M') { v <<= 20; end++; }
    else if (*end == 'g' || *end == 'G') { v <<= 30; end++; }
    if (*end) return -1;
    *out = v;
    return 0;
}

static int set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

int plat_init(int argc, char **argv) {
    const char *port = getenv("KV_PORT"), *bind_addr = getenv("KV_BIND"), *size = getenv("KV_DISK_SIZE");
    disk_path = getenv("KV_DISK");
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && strcmp(argv[i], "-p") == 0) port = argv[++i];
        else if (i + 1 < argc && strcmp(argv[i], "-b") == 0) bind_addr = argv[++i];
        else if (i + 1 < argc && strcmp(argv[i], "-d") == 0) disk_path = argv[++i];
        else if (i + 1 < argc && strcmp(argv[i], "-s") == 0) size = argv[++i];
        else {
            fprintf(stderr, "usage: %s [-p PORT] [-b ADDR] [-d DISK_FILE] [-s DISK_SIZE]\n", argv[0]);
            return -1;
        }
    }
    if (size && parse_size(size, &disk_new_size) != 0) {
        fprintf(stderr, "kv: bad disk size '%s'\n", size);
        return -1;
    }
    signal(SIGPIPE, SIG_IGN);

    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)atoi(port ? port : "6379"));
    if (inet_pton(AF_INET, bind_addr ? bind_addr : "127.0.0.1", &sa.sin_addr) != 1) {
        fprintf(stderr, "kv: bad bind address\n");
        return -1;
    }
    listen_fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (listen_fd < 0 || bind(listen_fd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(listen_fd, 511) != 0 ||
        set_nonblock(listen_fd) != 0) {
        fprintf(stderr, "kv: cannot listen on port %s: %s\n", port ? port : "6379", strerror(errno));
        return -1;
    }
    return 0;
}

int plat_listener(void) { return listen_fd; }

int plat_accept(int *fd) {
    int c = accept(listen_fd, NULL, NULL);
    if (c < 0) return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? PLAT_AGAIN : PLAT_ERR;
    int one = 1;
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (set_nonblock(c) != 0) {
        close(c);
        return PLAT_ERR;
    }
    *fd = c;
    return 0;
}

long plat_recv(int fd, void *buf, size_t len) {
    ssize_t n = recv(fd, buf, len, 0);
    if (n >= 0) return (long)n;
    return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? PLAT_AGAIN : PLAT_ERR;
}

long plat_send(int fd, const void *buf, size_t len) {
    ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
    if (n >= 0) return (long)n;
    return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? PLAT_AGAIN : PLAT_ERR;
}

void plat_close(int fd) { close(fd); }

static struct pollfd *pfds;
static int pfds_cap;

int plat_poll(plat_pollent_t *ents, int n) {
    if (n > pfds_cap) {
        pfds_cap = n + 64;
        pfds = xrealloc(pfds, sizeof(*pfds) * (size_t)pfds_cap);
    }
    for (int i = 0; i < n; i++) {
        pfds[i].fd = (ents[i].want_read || ents[i].want_write) ? ents[i].fd : -1;
        pfds[i].events = (short)((ents[i].want_read ? POLLIN : 0) | (ents[i].want_write ? POLLOUT : 0));
        pfds[i].revents = 0;
    }
    int r;
    do r = poll(pfds, (nfds_t)n, -1);
    while (r < 0 && errno == EINTR);
    if (r < 0) {
        fprintf(stderr, "kv: poll: %s\n", strerror(errno));
        return -1;
    }
    for (int i = 0; i < n; i++) {
        short re = pfds[i].revents;
        ents[i].readable = (re & (POLLIN | POLLHUP | POLLERR)) && ents[i].want_read;
        ents[i].writable = (re & (POLLOUT | POLLERR | POLLHUP)) && ents[i].want_write;
    }
    return 0;
}

int plat_disk_open(uint64_t *size) {
    if (!disk_path || !*disk_path) return 0;
    disk_fd = open(disk_path, O_RDWR | O_CREAT, 0644);
    struct stat st;
    if (disk_fd < 0 || fstat(disk_fd, &st) != 0) {
        fprintf(stderr, "kv: cannot open disk '%s': %s\n", disk_path, strerror(errno));
        return -1;
    }
    if (st.st_size == 0) {
        if (ftruncate(disk_fd, (off_t)disk_new_size) != 0) {
            fprintf(stderr, "kv: cannot size disk '%s': %s\n", disk_path, strerror(errno));
            return -1;
        }
        st.st_size = (off_t)disk_new_size;
    }
    disk_size = (uint64_t)st.st_size;
    *size = disk_size;
    return 1;
}

int plat_disk_pread(void *buf, size_t len, uint64_t off) {
    if (off > disk_size || len > disk_size - off) return -1;
    char *p = buf;
    while (len) {
        ssize_t n = pread(disk_fd, p, len, (off_t)off);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

int plat_disk_pwrite(const void *buf, size_t len, uint64_t off) {
    if (off > disk_size || len > disk_size - off) return -1; /* like the VM's fixed-size disk */
    const char *p = buf;
    while (len) {
        ssize_t n = pwrite(disk_fd, p, len, (off_t)off);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n;
        len -= (size_t)n;
        off += (uint64_t)n;
    }
    return 0;
}

#endif /* !__wasi__ */
