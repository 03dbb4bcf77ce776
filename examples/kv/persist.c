/*
 * kv - append-only command log on the VM disk (fd 4 / a file natively).
 *
 * Layout (all integers little-endian):
 *
 *   offset 0, header (40 bytes used of a 4096-byte block):
 *     0  char[8]  magic "COLOKVLG"
 *     8  u32      version (1)
 *     12 u32      epoch: bumped by every compaction / FLUSHALL
 *     16 u64      log start offset (4096)
 *     24 u64      log length in bytes (committed records)
 *     32 u32      CRC-32 of bytes 0..31
 *
 *   from offset 4096, records back to back:
 *     0  u32      payload length P
 *     4  u32      CRC-32 of (epoch u32, P u32, payload)
 *     8  payload: u32 argc, then argc x (u32 length, bytes) - a command's argv
 *
 * Write commands are applied in memory, encoded into a pending batch, and the
 * batch plus the updated header are written (records first, header last)
 * before any reply is sent. A record past the header's length, or one whose
 * CRC (which covers the epoch) does not verify, ends the replay, so stale
 * records from before a compaction are never applied.
 *
 * When a record does not fit, the log is compacted: rewritten in place as a
 * snapshot of the current data (SET / RPUSH / SADD / HSET / ZADD records, long
 * collections split into records of about 1 MiB) under a new epoch. If the
 * snapshot plus the new record still do not fit, the command is refused with
 * "-ERR disk full". Compaction overwrites the old log, so it is not
 * crash-atomic: a crash in the middle of one loses the data on restart.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kv.h"
#include "platform.h"

#define HDR_BLOCK 4096u
#define HDR_USED 40u
#define VERSION 1u
#define REC_HDR 8u
#define SNAP_CHUNK (1u << 20)
#define STAGE_FLUSH (1u << 20)
#define PENDING_FLUSH (4u << 20)
#define MAX_RECORD ((uint64_t)2 * KV_MAX_BULK + (4u << 20))

static const char MAGIC[8] = {'C', 'O', 'L', 'O', 'K', 'V', 'L', 'G'};

static int g_on;
static uint64_t g_disk;   /* disk size */
static uint64_t g_len;    /* committed log bytes after HDR_BLOCK */
static uint32_t g_epoch;
static buf_t g_pend;      /* encoded records not yet written */

static void put32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static void put64(unsigned char *p, uint64_t v) {
    put32(p, (uint32_t)v);
    put32(p + 4, (uint32_t)(v >> 32));
}

static uint32_t get32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get64(const unsigned char *p) { return get32(p) | (uint64_t)get32(p + 4) << 32; }

static void die_io(const char *what, uint64_t off) {
    fprintf(stderr, "kv: disk %s failed at offset %llu; stopping\n", what, (unsigned long long)off);
    fflush(stderr);
    exit(1);
}

static void disk_write(const void *p, size_t n, uint64_t off) {
    if (plat_disk_pwrite(p, n, off) != 0) die_io("write", off);
}

static void write_header(void) {
    unsigned char h[HDR_USED];
    memset(h, 0, sizeof h);
    memcpy(h, MAGIC, 8);
    put32(h + 8, VERSION);
    put32(h + 12, g_epoch);
    put64(h + 16, HDR_BLOCK);
    put64(h + 24, g_len);
    put32(h + 32, crc32_update(0, h, 32));
    disk_write(h, sizeof h, 0);
}

static uint32_t record_crc(uint32_t epoch, const unsigned char *payload, uint32_t plen) {
    unsigned char pre[8];
    put32(pre, epoch);
    put32(pre + 4, plen);
    return crc32_update(crc32_update(0, pre, 8), payload, plen);
}

int persist_enabled(void) { return g_on; }

uint64_t persist_record_size(int argc, const arg_t *argv) {
    uint64_t n = REC_HDR + 4;
    for (int i = 0; i < argc; i++) n += 4 + argv[i].len;
    return n;
}

/* Encodes one record at the end of b. */
static void encode_record(buf_t *b, int argc, const arg_t *argv) {
    uint64_t size = persist_record_size(argc, argv);
    buf_reserve(b, (size_t)size);
    unsigned char *rec = (unsigned char *)b->p + b->len;
    unsigned char *q = rec + REC_HDR;
    put32(q, (uint32_t)argc);
    q += 4;
    for (int i = 0; i < argc; i++) {
        put32(q, (uint32_t)argv[i].len);
        memcpy(q + 4, argv[i].p, argv[i].len);
        q += 4 + argv[i].len;
    }
    uint32_t plen = (uint32_t)(size - REC_HDR);
    put32(rec, plen);
    put32(rec + 4, record_crc(g_epoch, rec + REC_HDR, plen));
    b->len += (size_t)size;
}

void persist_append(int argc, const arg_t *argv) {
    if (!g_on) return;
    encode_record(&g_pend, argc, argv);
    if (g_pend.len >= PENDING_FLUSH) persist_flush();
}

void persist_flush(void) {
    if (!g_on || g_pend.len == 0) return;
    disk_write(g_pend.p, g_pend.len, HDR_BLOCK + g_len);
    g_len += g_pend.len;
    g_pend.len = 0;
    if (g_pend.cap > (16u << 20)) buf_free(&g_pend);
    write_header();
}

void persist_reset(void) {
    if (!g_on) return;
    g_pend.len = 0;
    g_epoch++;
    g_len = 0;
    write_header();
}

/* ---- snapshots --------------------------------------------------------------- */

typedef struct {
    int writing;          /* 0: only count bytes */
    uint64_t total;       /* bytes of records finished so far */
    /* record under construction */
    const char *cmd;
    const dent_t *key;
    uint64_t plen;        /* payload bytes so far */
    int argc;
    buf_t rec;            /* writing: the record being built */
    buf_t stage;          /* writing: finished records not yet on disk */
    uint64_t off;         /* writing: disk offset of stage[0] */
} snap_t;

static void snap_put_arg(snap_t *s, const char *p, size_t n) {
    s->plen += 4 + n;
    s->argc++;
    if (!s->writing) return;
    unsigned char l[4];
    put32(l, (uint32_t)n);
    buf_append(&s->rec, l, 4);
    buf_append(&s->rec, p, n);
}

static void snap_begin(snap_t *s) {
    s->plen = 4;
    s->argc = 0;
    if (s->writing) {
        s->rec.len = 0;
        buf_append(&s->rec, "\0\0\0\0\0\0\0\0\0\0\0\0", REC_HDR + 4); /* header + argc, patched later */
    }
    snap_put_arg(s, s->cmd, strlen(s->cmd));
    snap_put_arg(s, s->key->key, s->key->klen);
}

static void snap_end(snap_t *s) {
    if (s->argc <= 2) return;
    s->total += REC_HDR + s->plen;
    if (!s->writing) return;
    unsigned char *r = (unsigned char *)s->rec.p;
    put32(r + REC_HDR, (uint32_t)s->argc);
    put32(r, (uint32_t)s->plen);
    put32(r + 4, record_crc(g_epoch, r + REC_HDR, (uint32_t)s->plen));
    buf_append(&s->stage, s->rec.p, s->rec.len);
    if (s->stage.len >= STAGE_FLUSH) {
        disk_write(s->stage.p, s->stage.len, s->off);
        s->off += s->stage.len;
        s->stage.len = 0;
    }
}

/* Adds a group of arguments that must stay in one record (an element, a
 * field/value pair, a score/member pair), starting a new record first when the
 * current one is non-empty and would grow past SNAP_CHUNK. */
static void snap_group(snap_t *s, const arg_t *args, int n) {
    uint64_t add = 0;
    for (int i = 0; i < n; i++) add += 4 + args[i].len;
    if (s->argc > 2 && s->plen + add > SNAP_CHUNK) {
        snap_end(s);
        snap_begin(s);
    }
    for (int i = 0; i < n; i++) snap_put_arg(s, args[i].p, args[i].len);
}

static void snap_zset(snap_t *s, const znode_t *n) {
    while (n) { /* in-order walk; recursion only on the left side */
        snap_zset(s, n->l);
        char num[40];
        arg_t a[2];
        a[0].p = num;
        a[0].len = fmt_double(num, n->score);
        a[1].p = n->e->key;
        a[1].len = n->e->klen;
        snap_group(s, a, 2);
        n = n->r;
    }
}

static void snap_key(snap_t *s, const dent_t *e) {
    const robj_t *o = e->val;
    static const char *cmds[] = {"", "SET", "RPUSH", "SADD", "HSET", "ZADD"};
    s->cmd = cmds[o->type];
    s->key = e;
    snap_begin(s);
    arg_t a[2];
    uint32_t b = 0;
    switch (o->type) {
    case T_STRING:
        a[0].p = o->u.s->data;
        a[0].len = o->u.s->len;
        snap_put_arg(s, a[0].p, a[0].len); /* never split */
        break;
    case T_LIST:
        for (uint32_t i = 0; i < o->u.l->len; i++) {
            str_t *v = list_at(o->u.l, i);
            a[0].p = v->data;
            a[0].len = v->len;
            snap_group(s, a, 1);
        }
        break;
    case T_SET:
        for (dent_t *m = NULL; (m = dict_next(o->u.set, &b, m));) {
            a[0].p = m->key;
            a[0].len = m->klen;
            snap_group(s, a, 1);
        }
        break;
    case T_HASH:
        for (dent_t *m = NULL; (m = dict_next(o->u.hash, &b, m));) {
            str_t *v = m->val;
            a[0].p = m->key;
            a[0].len = m->klen;
            a[1].p = v->data;
            a[1].len = v->len;
            snap_group(s, a, 2);
        }
        break;
    case T_ZSET:
        snap_zset(s, o->u.z->root);
        break;
    }
    snap_end(s);
}

uint64_t persist_key_snapshot_size(const dent_t *key) {
    snap_t s;
    memset(&s, 0, sizeof s);
    snap_key(&s, key);
    return s.total;
}

uint64_t persist_snapshot_size(void) {
    snap_t s;
    memset(&s, 0, sizeof s);
    uint32_t b = 0;
    for (dent_t *e = NULL; (e = dict_next(g_db, &b, e));) snap_key(&s, e);
    return s.total;
}

int persist_snapshot_fits(uint64_t bytes) { return HDR_BLOCK + bytes <= g_disk; }

void persist_compact(void) {
    if (!g_on) return;
    uint64_t before = g_len + g_pend.len;
    g_pend.len = 0; /* everything pending is already part of the in-memory data */
    g_epoch++;
    snap_t s;
    memset(&s, 0, sizeof s);
    s.writing = 1;
    s.off = HDR_BLOCK;
    uint32_t b = 0;
    for (dent_t *e = NULL; (e = dict_next(g_db, &b, e));) snap_key(&s, e);
    if (s.stage.len) disk_write(s.stage.p, s.stage.len, s.off);
    buf_free(&s.stage);
    buf_free(&s.rec);
    g_len = s.total;
    write_header();
    fprintf(stderr, "kv: compacted log %llu -> %llu bytes (%u keys)\n", (unsigned long long)before,
            (unsigned long long)g_len, g_db->count);
    fflush(stderr);
}

int persist_reserve(uint64_t size) {
    if (!g_on) return 0;
    if (HDR_BLOCK + g_len + g_pend.len + size <= g_disk) return 0;
    uint64_t snap = persist_snapshot_size();
    if (HDR_BLOCK + snap + size > g_disk) return -1;
    persist_compact();
    return 0;
}

/* ---- start-up: open, format or replay ------------------------------------------ */

static unsigned char *rd_buf;
static size_t rd_cap, rd_fill;
static uint64_t rd_base, rd_end;

/* Makes [off, off+n) of the log readable; NULL if it extends past rd_end. */
static const unsigned char *rd(uint64_t off, uint64_t n) {
    if (off + n > rd_end) return NULL;
    if (off >= rd_base && off + n <= rd_base + rd_fill) return rd_buf + (off - rd_base);
    if (n > rd_cap) {
        free(rd_buf);
        rd_cap = (size_t)n;
        rd_buf = xmalloc(rd_cap);
    }
    uint64_t want = rd_end - off < rd_cap ? rd_end - off : rd_cap;
    if (plat_disk_pread(rd_buf, (size_t)want, off) != 0) die_io("read", off);
    rd_base = off;
    rd_fill = (size_t)want;
    return rd_buf;
}

static void replay(void) {
    rd_cap = 1u << 20;
    rd_buf = xmalloc(rd_cap);
    rd_base = rd_fill = 0;
    rd_end = HDR_BLOCK + g_len;
    uint64_t pos = HDR_BLOCK, nrec = 0, nerr = 0;
    arg_t *argv = NULL;
    size_t argv_cap = 0;
    buf_t scratch = {0};
    const char *why = NULL;
    while (pos < rd_end) {
        const unsigned char *h = rd(pos, REC_HDR);
        if (!h) { why = "truncated record header"; break; }
        uint32_t plen = get32(h), crc = get32(h + 4);
        if (plen < 8 || plen > MAX_RECORD) { why = "bad record length"; break; }
        const unsigned char *p = rd(pos + REC_HDR, plen);
        if (!p) { why = "truncated record"; break; }
        if (record_crc(g_epoch, p, plen) != crc) { why = "checksum mismatch"; break; }
        uint32_t argc = get32(p);
        if (argc == 0 || argc > plen / 4) { why = "bad argument count"; break; }
        if (argc > argv_cap) {
            argv_cap = argc;
            argv = xrealloc(argv, sizeof(arg_t) * argv_cap);
        }
        uint64_t q = 4;
        for (uint32_t i = 0; i < argc && !why; i++) {
            if (q + 4 > plen) { why = "bad argument"; break; }
            uint32_t l = get32(p + q);
            if (l > plen - q - 4) { why = "bad argument"; break; }
            argv[i].p = (const char *)p + q + 4;
            argv[i].len = l;
            q += 4 + (uint64_t)l;
        }
        if (!why && q != plen) why = "bad argument";
        if (why) break;
        cmdctx_t c;
        memset(&c, 0, sizeof c);
        c.argc = (int)argc;
        c.argv = argv;
        c.out = &scratch;
        c.replaying = 1;
        scratch.len = 0;
        command_exec(&c);
        if (scratch.len && scratch.p[0] == '-') nerr++;
        pos += REC_HDR + plen;
        nrec++;
    }
    free(argv);
    buf_free(&scratch);
    free(rd_buf);
    rd_buf = NULL;
    if (nrec || why)
        fprintf(stderr, "kv: replayed %llu log records (%llu bytes)\n", (unsigned long long)nrec,
                (unsigned long long)(pos - HDR_BLOCK));
    if (nerr) fprintf(stderr, "kv: warning: %llu replayed records failed\n", (unsigned long long)nerr);
    if (why) {
        fprintf(stderr, "kv: log ends early at offset %llu (%s); dropping the %llu bytes after it\n",
                (unsigned long long)pos, why, (unsigned long long)(rd_end - pos));
        g_len = pos - HDR_BLOCK;
        write_header();
    }
}

int persist_open(void) {
    uint64_t size = 0;
    int r = plat_disk_open(&size);
    if (r == 0) return 0; /* no disk: memory only */
    if (r < 0) exit(1);   /* the platform layer said why */
    if (size < HDR_BLOCK + 64) {
        fprintf(stderr, "kv: disk too small (%llu bytes, need at least %u)\n", (unsigned long long)size,
                HDR_BLOCK + 64);
        exit(1);
    }
    g_disk = size;
    g_on = 1;
    unsigned char h[HDR_USED];
    if (plat_disk_pread(h, sizeof h, 0) != 0) die_io("read", 0);
    if (memcmp(h, MAGIC, 8) != 0) {
        g_epoch = 1;
        g_len = 0;
        write_header();
        fprintf(stderr, "kv: formatted empty disk (%llu bytes)\n", (unsigned long long)size);
        return 0;
    }
    if (get32(h + 32) != crc32_update(0, h, 32) || get32(h + 8) != VERSION || get64(h + 16) != HDR_BLOCK ||
        get64(h + 24) > size - HDR_BLOCK) {
        fprintf(stderr, "kv: disk header is corrupt or of an unsupported version; refusing to start\n");
        exit(1);
    }
    g_epoch = get32(h + 12);
    g_len = get64(h + 24);
    replay();
    return 0;
}
