/*
 * The lock-step floor's proxy (bench only, built by bench/colo.ts with `cc -O2`): what any
 * lock-stepping system must do at the least, with none of COLO's own machinery, in native
 * code so that its own hop costs as little as it can. It listens on a port and, for each
 * client connection, opens one connection to each backend (one or two lone, unprotected
 * VMs); every byte from the client goes to every backend; a reply byte goes to the client
 * only when every backend has produced it (line by line: the lines are compared, a
 * difference is counted, and the first backend's lines go out). No checkpoints, no state transfer, no failover.
 *
 *   lockstep-proxy LISTEN_PORT BACKEND_PORT [BACKEND_PORT]
 *
 * Prints "ready PORT" when it listens (port 0: the one chosen). On SIGTERM it prints one JSON
 * line of counters and exits. One thread, epoll, level-triggered reads, blocking writes (a
 * bench's client reads its replies; loopback buffers are far larger than a reply).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

struct pending {
  char *data;
  size_t len, cap;
};

struct conn {
  int client;
  int backend[2];
  struct pending out[2];
  /* epoll tags: 0 = client, 1 + i = backend i */
  struct tag { struct conn *c; int which; } tags[3];
};

static int nbackends;
static int backend_port[2];
static volatile sig_atomic_t stopping;
static unsigned long long connections, released_bytes, mismatches;

static void on_term(int sig) { (void)sig; stopping = 1; }

static void nodelay(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static int write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

static int dial(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_port = htons((unsigned short)port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
    if (fd >= 0) close(fd);
    return -1;
  }
  nodelay(fd);
  return fd;
}

static void drop(int ep, struct conn *c) {
  epoll_ctl(ep, EPOLL_CTL_DEL, c->client, NULL);
  close(c->client);
  for (int i = 0; i < nbackends; i++) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->backend[i], NULL);
    close(c->backend[i]);
    free(c->out[i].data);
  }
  free(c);
}

static void append(struct pending *p, const char *d, size_t n) {
  if (p->len + n > p->cap) {
    p->cap = (p->len + n) * 2;
    p->data = realloc(p->data, p->cap);
    if (p->data == NULL) abort();
  }
  memcpy(p->data + p->len, d, n);
  p->len += n;
}

/* End of the first line ("\r\n" included) at or after `from` in p, or 0 when there is none. */
static size_t line_end(const struct pending *p, size_t from) {
  for (size_t i = from; i + 1 < p->len; i++)
    if (p->data[i] == '\r' && p->data[i + 1] == '\n') return i + 2;
  return 0;
}

static void consume(struct pending *p, size_t n) {
  memmove(p->data, p->data + n, p->len - n);
  p->len -= n;
}

/*
 * Sends what every backend has produced; -1 when the client is gone. With two backends the
 * unit is a line (RESP replies are lines; a bulk reply is two): the lines both have produced
 * are compared and the first backend's go out. Bytes would not do: two VMs that got the
 * connections' requests in different orders answer INCR with different numbers, of
 * different lengths, and a reply cut short would wait for ever.
 */
static int release(struct conn *c) {
  size_t n0 = c->out[0].len, n1 = 0;
  if (nbackends == 2) {
    n0 = 0;
    for (;;) {
      size_t e0 = line_end(&c->out[0], n0), e1 = line_end(&c->out[1], n1);
      if (e0 == 0 || e1 == 0) break;
      n0 = e0;
      n1 = e1;
    }
  }
  if (n0 == 0) return 0;
  if (nbackends == 2 && (n0 != n1 || memcmp(c->out[0].data, c->out[1].data, n0) != 0)) mismatches++;
  if (write_all(c->client, c->out[0].data, n0) < 0) return -1;
  released_bytes += n0;
  consume(&c->out[0], n0);
  if (nbackends == 2) consume(&c->out[1], n1);
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 3 || argc > 4) {
    fprintf(stderr, "usage: lockstep-proxy LISTEN_PORT BACKEND_PORT [BACKEND_PORT]\n");
    return 2;
  }
  nbackends = argc - 2;
  for (int i = 0; i < nbackends; i++) backend_port[i] = atoi(argv[2 + i]);
  struct sigaction sa = {0};
  sa.sa_handler = on_term;
  sigaction(SIGTERM, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);

  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {0};
  a.sin_family = AF_INET;
  a.sin_port = htons((unsigned short)atoi(argv[1]));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t alen = sizeof a;
  if (bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 || listen(lfd, 128) < 0 || getsockname(lfd, (struct sockaddr *)&a, &alen) < 0) {
    perror("lockstep-proxy: listen");
    return 1;
  }
  int ep = epoll_create1(0);
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
  epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
  printf("ready %d\n", ntohs(a.sin_port));
  fflush(stdout);

  static char buf[65536];
  struct epoll_event events[64];
  while (!stopping) {
    int n = epoll_wait(ep, events, 64, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      perror("lockstep-proxy: epoll_wait");
      return 1;
    }
    for (int k = 0; k < n; k++) {
      struct tag *t = events[k].data.ptr;
      if (t == NULL) {
        int cfd = accept(lfd, NULL, NULL);
        if (cfd < 0) continue;
        nodelay(cfd);
        struct conn *c = calloc(1, sizeof *c);
        c->client = cfd;
        int ok = 1;
        for (int i = 0; i < nbackends; i++) {
          c->backend[i] = dial(backend_port[i]);
          if (c->backend[i] < 0) ok = 0;
        }
        if (!ok) {
          close(cfd);
          for (int i = 0; i < nbackends; i++)
            if (c->backend[i] >= 0) close(c->backend[i]);
          free(c);
          continue;
        }
        connections++;
        for (int i = 0; i < 1 + nbackends; i++) {
          c->tags[i].c = c;
          c->tags[i].which = i;
          struct epoll_event e = {.events = EPOLLIN, .data.ptr = &c->tags[i]};
          epoll_ctl(ep, EPOLL_CTL_ADD, i == 0 ? c->client : c->backend[i - 1], &e);
        }
        continue;
      }
      struct conn *c = t->c;
      int fd = t->which == 0 ? c->client : c->backend[t->which - 1];
      ssize_t r = read(fd, buf, sizeof buf);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        drop(ep, c);
        /* the other events of this batch may name the same connection: stop the batch */
        break;
      }
      int bad = 0;
      if (t->which == 0) {
        for (int i = 0; i < nbackends; i++)
          if (write_all(c->backend[i], buf, (size_t)r) < 0) bad = 1;
      } else {
        append(&c->out[t->which - 1], buf, (size_t)r);
        if (release(c) < 0) bad = 1;
      }
      if (bad) {
        drop(ep, c);
        break;
      }
    }
  }
  printf("{\"connections\":%llu,\"releasedBytes\":%llu,\"mismatches\":%llu}\n", connections, released_bytes, mismatches);
  fflush(stdout);
  return 0;
}
