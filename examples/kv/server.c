/*
 * kv - connections, RESP2 / inline request parsing and the event loop.
 *
 * One thread, one poll loop, nonblocking connection fds. The poll never has a
 * timeout: when there is nothing to do, kv blocks until a socket is ready, so
 * under colo-vm the guest is a pure function of its input stream.
 *
 * Each loop iteration: execute every complete buffered request (pipelined
 * requests included) of every client, write the disk log batch, then send the
 * replies; repeat until nothing is runnable; then poll.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kv.h"
#include "platform.h"

#define READ_CHUNK (16u << 10)

typedef struct {
    int fd;
    buf_t in;
    size_t rpos;          /* start of the request being parsed */
    size_t ppos;          /* parse position (>= rpos) */
    /* multibulk parse state */
    long long mb_count;   /* -1: no header parsed yet */
    long long mb_have;
    long long bulk_len;   /* -1: expecting a "$<len>" line */
    size_t *offs, *lens;  /* argument offsets (relative to rpos) and lengths */
    size_t args_cap;
    buf_t arena;          /* unescaped inline arguments */
    int need_more;        /* the parser stopped at an incomplete request */
    buf_t out;
    size_t opos;          /* sent bytes of out */
    int eof, closing, dead;
} conn_t;

static conn_t **conns;
static int nconns, conns_cap;

static arg_t *g_argv;
static size_t g_argv_cap;

static void argv_reserve(size_t n) {
    if (n <= g_argv_cap) return;
    g_argv_cap = n < 64 ? 64 : n;
    g_argv = xrealloc(g_argv, sizeof(arg_t) * g_argv_cap);
}

static size_t out_pending(const conn_t *c) { return c->out.len - c->opos; }

static void reset_parse(conn_t *c) {
    c->mb_count = -1;
    c->mb_have = 0;
    c->bulk_len = -1;
}

static void protocol_error(conn_t *c, const char *msg) {
    char tmp[160];
    snprintf(tmp, sizeof tmp, "ERR Protocol error: %s", msg);
    reply_error(&c->out, tmp);
    c->closing = 1;
}

/* Parses a decimal (possibly negative) integer line [p, p+n). */
static int parse_line_int(const char *p, size_t n, long long *v) {
    if (n && p[n - 1] == '\r') n--;
    return parse_ll(p, n, v);
}

/* ---- inline requests ------------------------------------------------------ */

static int hexval(char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

static int is_space(char ch) { return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n' || ch == '\v' || ch == '\f'; }

/* Splits an inline command line into arguments stored in c->arena; returns
 * argc, or -1 on unbalanced quotes. Double quotes understand \n \r \t \b \a
 * \\ \" and \xHH; single quotes understand \'. */
static long long split_inline(conn_t *c, const char *s, size_t n) {
    c->arena.len = 0;
    size_t i = 0, argc = 0;
    size_t *st = NULL, st_cap = 0; /* (offset, length) pairs into the arena */
    for (;;) {
        while (i < n && is_space(s[i])) i++;
        if (i >= n) break;
        if (argc + 1 > st_cap) {
            st_cap = st_cap ? st_cap * 2 : 16;
            st = xrealloc(st, sizeof(size_t) * 2 * st_cap);
        }
        size_t start = c->arena.len;
        if (s[i] == '"') {
            i++;
            for (;;) {
                if (i >= n) { free(st); return -1; }
                if (s[i] == '"') { i++; break; }
                if (s[i] == '\\' && i + 3 < n && s[i + 1] == 'x' && hexval(s[i + 2]) >= 0 && hexval(s[i + 3]) >= 0) {
                    buf_putc(&c->arena, (char)(hexval(s[i + 2]) * 16 + hexval(s[i + 3])));
                    i += 4;
                } else if (s[i] == '\\' && i + 1 < n) {
                    char e = s[i + 1];
                    buf_putc(&c->arena, e == 'n' ? '\n' : e == 'r' ? '\r' : e == 't' ? '\t' : e == 'b' ? '\b' : e == 'a' ? '\a' : e);
                    i += 2;
                } else {
                    buf_putc(&c->arena, s[i++]);
                }
            }
            if (i < n && !is_space(s[i])) { free(st); return -1; }
        } else if (s[i] == '\'') {
            i++;
            for (;;) {
                if (i >= n) { free(st); return -1; }
                if (s[i] == '\'') { i++; break; }
                if (s[i] == '\\' && i + 1 < n && s[i + 1] == '\'') {
                    buf_putc(&c->arena, '\'');
                    i += 2;
                } else {
                    buf_putc(&c->arena, s[i++]);
                }
            }
            if (i < n && !is_space(s[i])) { free(st); return -1; }
        } else {
            while (i < n && !is_space(s[i])) buf_putc(&c->arena, s[i++]);
        }
        st[2 * argc] = start;
        st[2 * argc + 1] = c->arena.len - start;
        argc++;
    }
    argv_reserve(argc);
    for (size_t k = 0; k < argc; k++) {
        g_argv[k].p = c->arena.p + st[2 * k];
        g_argv[k].len = st[2 * k + 1];
    }
    free(st);
    return (long long)argc;
}

/* ---- request parsing --------------------------------------------------------- */

/* 1: a request is ready in g_argv (*argc); 2: nothing to execute (empty line,
 * "*0"), 0: need more input; -1: protocol error (reply queued, closing). */
static int parse_request(conn_t *c, int *argc) {
    char *in = c->in.p;
    size_t len = c->in.len;
    if (c->mb_count < 0 && in[c->rpos] != '*') {
        char *nl = memchr(in + c->rpos, '\n', len - c->rpos);
        if (!nl) {
            if (len - c->rpos > KV_MAX_INLINE) { protocol_error(c, "too big inline request"); return -1; }
            return 0;
        }
        size_t end = (size_t)(nl - in);
        long long n = split_inline(c, in + c->rpos, end - c->rpos);
        c->ppos = end + 1;
        if (n < 0) { protocol_error(c, "unbalanced quotes in request"); return -1; }
        if (n == 0) return 2;
        *argc = (int)n;
        return 1;
    }
    if (c->mb_count < 0) {
        char *nl = memchr(in + c->rpos, '\n', len - c->rpos);
        if (!nl) {
            if (len - c->rpos > KV_MAX_INLINE) { protocol_error(c, "too big mbulk count string"); return -1; }
            return 0;
        }
        long long n;
        if (parse_line_int(in + c->rpos + 1, (size_t)(nl - in) - c->rpos - 1, &n) != 0 || n > KV_MAX_ARGS) {
            protocol_error(c, "invalid multibulk length");
            return -1;
        }
        c->ppos = (size_t)(nl - in) + 1;
        if (n <= 0) return 2;
        c->mb_count = n;
        c->mb_have = 0;
        c->bulk_len = -1;
    }
    while (c->mb_have < c->mb_count) {
        if (c->bulk_len < 0) {
            if (c->ppos >= len) return 0;
            if (in[c->ppos] != '$') {
                char msg[64];
                unsigned char ch = (unsigned char)in[c->ppos];
                snprintf(msg, sizeof msg, ch >= 32 && ch < 127 ? "expected '$', got '%c'" : "expected '$', got byte %u",
                         ch);
                protocol_error(c, msg);
                return -1;
            }
            char *nl = memchr(in + c->ppos, '\n', len - c->ppos);
            if (!nl) {
                if (len - c->ppos > 32) { protocol_error(c, "invalid bulk length"); return -1; }
                return 0;
            }
            long long bl;
            if (parse_line_int(in + c->ppos + 1, (size_t)(nl - in) - c->ppos - 1, &bl) != 0 || bl < 0 ||
                bl > KV_MAX_BULK) {
                protocol_error(c, "invalid bulk length");
                return -1;
            }
            c->ppos = (size_t)(nl - in) + 1;
            c->bulk_len = bl;
            if ((c->ppos - c->rpos) + (size_t)bl + 2 > KV_MAX_REQUEST) {
                protocol_error(c, "request too large");
                return -1;
            }
        }
        size_t need = (size_t)c->bulk_len + 2;
        if (len - c->ppos < need) {
            /* make room for the whole bulk so recv can land it in place */
            buf_reserve(&c->in, c->ppos + need - len);
            return 0;
        }
        if ((size_t)c->mb_have >= c->args_cap) {
            c->args_cap = c->args_cap ? c->args_cap * 2 : 16;
            c->offs = xrealloc(c->offs, sizeof(size_t) * c->args_cap);
            c->lens = xrealloc(c->lens, sizeof(size_t) * c->args_cap);
        }
        c->offs[c->mb_have] = c->ppos - c->rpos;
        c->lens[c->mb_have] = (size_t)c->bulk_len;
        c->mb_have++;
        c->ppos += need;
        c->bulk_len = -1;
    }
    argv_reserve((size_t)c->mb_count);
    for (long long k = 0; k < c->mb_count; k++) {
        g_argv[k].p = c->in.p + c->rpos + c->offs[k];
        g_argv[k].len = c->lens[k];
    }
    *argc = (int)c->mb_count;
    return 1;
}

static int can_progress(const conn_t *c) {
    return !c->dead && !c->closing && !c->need_more && c->rpos < c->in.len && out_pending(c) < KV_OUT_SOFT_LIMIT;
}

static void process_input(conn_t *c) {
    while (can_progress(c)) {
        int argc = 0;
        int r = parse_request(c, &argc);
        if (r == 0) {
            c->need_more = 1;
            break;
        }
        if (r < 0) break;
        if (r == 1) {
            cmdctx_t ctx;
            memset(&ctx, 0, sizeof ctx);
            ctx.argc = argc;
            ctx.argv = g_argv;
            ctx.out = &c->out;
            command_exec(&ctx);
            if (ctx.close_after) c->closing = 1;
        }
        c->rpos = c->ppos;
        reset_parse(c);
    }
    if (c->rpos == c->in.len) {
        c->in.len = c->rpos = c->ppos = 0;
        if (c->in.cap > (1u << 20)) buf_free(&c->in);
        if (c->arena.cap > (1u << 20)) buf_free(&c->arena);
    }
}

/* ---- socket I/O ------------------------------------------------------------------ */

static void read_conn(conn_t *c) {
    if (c->rpos > 0) { /* move the partial request to the front */
        memmove(c->in.p, c->in.p + c->rpos, c->in.len - c->rpos);
        c->in.len -= c->rpos;
        c->ppos -= c->rpos;
        c->rpos = 0;
    }
    buf_reserve(&c->in, READ_CHUNK);
    long n = plat_recv(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len);
    if (n > 0) {
        c->in.len += (size_t)n;
        c->need_more = 0;
    } else if (n == 0) {
        c->eof = 1;
    } else if (n == PLAT_ERR) {
        c->dead = 1;
    }
}

static void write_conn(conn_t *c) {
    while (out_pending(c) > 0) {
        long n = plat_send(c->fd, c->out.p + c->opos, out_pending(c));
        if (n == PLAT_AGAIN) return;
        if (n < 0) {
            c->dead = 1;
            return;
        }
        c->opos += (size_t)n;
    }
    c->out.len = c->opos = 0;
    if (c->out.cap > (1u << 20)) buf_free(&c->out);
}

static void conn_free(conn_t *c) {
    plat_close(c->fd);
    buf_free(&c->in);
    buf_free(&c->out);
    buf_free(&c->arena);
    free(c->offs);
    free(c->lens);
    free(c);
}

static void accept_one(void) {
    int fd;
    if (plat_accept(&fd) != 0) return;
    if (nconns >= KV_MAX_CLIENTS) {
        static const char msg[] = "-ERR max number of clients reached\r\n";
        (void)plat_send(fd, msg, sizeof msg - 1);
        plat_close(fd);
        return;
    }
    if (nconns == conns_cap) {
        conns_cap = conns_cap ? conns_cap * 2 : 64;
        conns = xrealloc(conns, sizeof(conn_t *) * (size_t)conns_cap);
    }
    conn_t *c = xcalloc(1, sizeof(conn_t));
    c->fd = fd;
    reset_parse(c);
    conns[nconns++] = c;
}

/* ---- event loop --------------------------------------------------------------------- */

static int should_close(const conn_t *c) {
    return c->dead || ((c->eof || c->closing) && out_pending(c) == 0 && !can_progress(c));
}

static void serve(void) {
    plat_pollent_t *ents = NULL;
    int ents_cap = 0;
    for (;;) {
        int progress;
        do {
            progress = 0;
            for (int i = 0; i < nconns; i++) process_input(conns[i]);
            persist_flush(); /* acknowledged writes are on disk before any reply leaves */
            for (int i = 0; i < nconns; i++) {
                conn_t *c = conns[i];
                if (out_pending(c) > 0) write_conn(c);
                if (can_progress(c)) progress = 1;
            }
            int k = 0;
            for (int i = 0; i < nconns; i++) {
                if (should_close(conns[i])) conn_free(conns[i]);
                else conns[k++] = conns[i];
            }
            nconns = k;
        } while (progress);

        if (nconns + 1 > ents_cap) {
            ents_cap = (nconns + 1) * 2;
            ents = xrealloc(ents, sizeof(*ents) * (size_t)ents_cap);
        }
        ents[0].fd = plat_listener();
        ents[0].want_read = 1;
        ents[0].want_write = 0;
        for (int i = 0; i < nconns; i++) {
            conn_t *c = conns[i];
            ents[i + 1].fd = c->fd;
            ents[i + 1].want_read = !c->eof && !c->closing && out_pending(c) < KV_OUT_SOFT_LIMIT;
            ents[i + 1].want_write = out_pending(c) > 0;
        }
        if (plat_poll(ents, nconns + 1) != 0) exit(1);
        for (int i = 0; i < nconns; i++)
            if (ents[i + 1].readable) read_conn(conns[i]);
        if (ents[0].readable) accept_one(); /* one per readiness: never blocks */
    }
}

int main(int argc, char **argv) {
    if (plat_init(argc, argv) != 0) return 1;
    commands_init();
    persist_open();
    printf("kv ready keys=%u\n", g_db->count);
    fflush(stdout);
    serve();
    return 0;
}
