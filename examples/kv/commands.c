/*
 * kv - command table and implementations.
 *
 * Every reply is a pure function of the data and the command (no randomness),
 * except TIME, which reads the wall clock (COLO's mismatch test uses it). SPOP removes the first member in the set's iteration order and
 * is logged as the equivalent SREM, so the log replays exactly.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kv.h"

dict_t *g_db;

/* ---- replies ------------------------------------------------------------- */

static void crlf(buf_t *o) { buf_append(o, "\r\n", 2); }

void reply_simple(buf_t *o, const char *s) {
    buf_putc(o, '+');
    buf_append(o, s, strlen(s));
    crlf(o);
}

void reply_error(buf_t *o, const char *s) {
    buf_putc(o, '-');
    buf_append(o, s, strlen(s));
    crlf(o);
}

static void reply_prefixed(buf_t *o, char type, long long v) {
    char tmp[32];
    tmp[0] = type;
    size_t n = 1 + fmt_ll(tmp + 1, v);
    tmp[n++] = '\r';
    tmp[n++] = '\n';
    buf_append(o, tmp, n);
}

void reply_int(buf_t *o, long long v) { reply_prefixed(o, ':', v); }
void reply_array(buf_t *o, long long n) { reply_prefixed(o, '*', n); }
void reply_null(buf_t *o) { buf_append(o, "$-1\r\n", 5); }
static void reply_null_array(buf_t *o) { buf_append(o, "*-1\r\n", 5); }
static void reply_ok(buf_t *o) { buf_append(o, "+OK\r\n", 5); }

void reply_bulk(buf_t *o, const char *p, size_t len) {
    buf_reserve(o, len + 32);
    char *q = o->p + o->len;
    *q++ = '$';
    q += fmt_ll(q, (long long)len);
    *q++ = '\r';
    *q++ = '\n';
    memcpy(q, p, len);
    q += len;
    *q++ = '\r';
    *q++ = '\n';
    o->len = (size_t)(q - o->p);
}

static void reply_str(buf_t *o, const str_t *s) { reply_bulk(o, s->data, s->len); }
static void reply_key(buf_t *o, const dent_t *e) { reply_bulk(o, e->key, e->klen); }

void reply_double(buf_t *o, double d) {
    char tmp[40];
    size_t n = fmt_double(tmp, d);
    reply_bulk(o, tmp, n);
}

static const char E_WRONGTYPE[] = "WRONGTYPE Operation against a key holding the wrong kind of value";
static const char E_NOTINT[] = "ERR value is not an integer or out of range";
static const char E_NOTFLOAT[] = "ERR value is not a valid float";
static const char E_SYNTAX[] = "ERR syntax error";
static const char E_OVERFLOW[] = "ERR increment or decrement would overflow";
static const char E_POSITIVE[] = "ERR value is out of range, must be positive";
static const char E_TOOBIG[] = "ERR string exceeds maximum allowed size (proto-max-bulk-len)";

/* ---- keyspace helpers ------------------------------------------------------ */

static dent_t *db_find(const arg_t *k) { return dict_find(g_db, k->p, k->len); }

static int db_delete(const char *k, size_t klen) {
    dent_t *e = dict_unlink(g_db, k, klen);
    if (!e) return 0;
    obj_free(e->val);
    free(e);
    return 1;
}

/* Returns the object at key k if it has the given type; NULL if missing.
 * On a type mismatch replies WRONGTYPE and sets *err. */
static robj_t *get_typed(cmdctx_t *c, const arg_t *k, int type, int *err) {
    *err = 0;
    dent_t *e = db_find(k);
    if (!e) return NULL;
    robj_t *o = e->val;
    if (o->type != type) {
        reply_error(c->out, E_WRONGTYPE);
        *err = 1;
        return NULL;
    }
    return o;
}

/* Finds or creates a collection; NULL (after replying WRONGTYPE) on a type mismatch. */
static robj_t *get_or_create(cmdctx_t *c, const arg_t *k, int type) {
    int created;
    dent_t *e = dict_upsert(g_db, k->p, k->len, &created);
    if (created) e->val = obj_new(type);
    robj_t *o = e->val;
    if (o->type != type) {
        reply_error(c->out, E_WRONGTYPE);
        return NULL;
    }
    return o;
}

static void set_string(const arg_t *k, const char *v, size_t vlen) {
    int created;
    dent_t *e = dict_upsert(g_db, k->p, k->len, &created);
    robj_t *o = e->val;
    if (o && o->type == T_STRING) {
        free(o->u.s);
    } else {
        obj_free(o);
        o = e->val = obj_new(T_STRING);
    }
    o->u.s = str_new(v, vlen);
}

static int collection_len(const robj_t *o) {
    switch (o->type) {
    case T_LIST: return (int)o->u.l->len;
    case T_SET: return (int)o->u.set->count;
    case T_HASH: return (int)o->u.hash->count;
    case T_ZSET: return (int)o->u.z->d->count;
    default: return 1;
    }
}

/* Deletes the key if its collection became empty. */
static void drop_if_empty(const arg_t *k, const robj_t *o) {
    if (collection_len(o) == 0) db_delete(k->p, k->len);
}

static int get_ll(cmdctx_t *c, const arg_t *a, long long *v) {
    if (parse_ll(a->p, a->len, v) == 0) return 0;
    reply_error(c->out, E_NOTINT);
    return -1;
}

/* Optional COUNT argument for the pop family: -1 when absent. */
static int get_count(cmdctx_t *c, int idx, long long *count) {
    *count = -1;
    if (c->argc <= idx) return 0;
    if (c->argc > idx + 1) {
        reply_error(c->out, E_SYNTAX);
        return -1;
    }
    if (parse_ll(c->argv[idx].p, c->argv[idx].len, count) != 0 || *count < 0) {
        reply_error(c->out, E_POSITIVE);
        return -1;
    }
    return 0;
}

/* The handler writes its own log record instead of the command's argv.
 * Call log_reserve before changing anything; -1 means "disk full" was replied. */
static int log_reserve(cmdctx_t *c, int argc, const arg_t *argv) {
    if (!c->logging) return 0;
    if (persist_reserve(persist_record_size(argc, argv)) == 0) return 0;
    reply_error(c->out, "ERR disk full");
    return -1;
}

static void log_custom(cmdctx_t *c, int argc, const arg_t *argv) {
    if (c->logging) persist_append(argc, argv);
    c->logged = 1;
}

/* ---- connection / server ---------------------------------------------------- */

static void cmd_ping(cmdctx_t *c) {
    if (c->argc > 2) {
        reply_error(c->out, "ERR wrong number of arguments for 'ping' command");
    } else if (c->argc == 2) {
        reply_bulk(c->out, c->argv[1].p, c->argv[1].len);
    } else {
        buf_append(c->out, "+PONG\r\n", 7);
    }
}

/* TIME: the wall clock, as Redis answers it. The one command whose reply depends on more than
 * the input: under COLO the primary's and the secondary's replies differ, and the compare asks
 * for a checkpoint (a mismatch). */
static void cmd_time(cmdctx_t *c) {
    struct timespec ts;
    char buf[32];
    clock_gettime(CLOCK_REALTIME, &ts);
    reply_array(c->out, 2);
    int n = snprintf(buf, sizeof buf, "%lld", (long long)ts.tv_sec);
    reply_bulk(c->out, buf, (size_t)n);
    n = snprintf(buf, sizeof buf, "%ld", (long)(ts.tv_nsec / 1000));
    reply_bulk(c->out, buf, (size_t)n);
}

static void cmd_echo(cmdctx_t *c) { reply_bulk(c->out, c->argv[1].p, c->argv[1].len); }

static void cmd_quit(cmdctx_t *c) {
    reply_ok(c->out);
    c->close_after = 1;
}

static void cmd_select(cmdctx_t *c) {
    if (arg_eq(&c->argv[1], "0")) reply_ok(c->out);
    else reply_error(c->out, "ERR DB index is out of range");
}

static void cmd_config(cmdctx_t *c) {
    const arg_t *sub = &c->argv[1];
    if (arg_eq(sub, "get")) {
        if (c->argc < 3) {
            reply_error(c->out, "ERR wrong number of arguments for 'config|get' command");
            return;
        }
        const char *names[] = {"save", "appendonly", "appendfsync", "databases", "maxmemory",
                               "maxclients", "proto-max-bulk-len"};
        char maxclients[24], maxbulk[24];
        maxclients[fmt_ll(maxclients, KV_MAX_CLIENTS)] = '\0';
        maxbulk[fmt_ll(maxbulk, KV_MAX_BULK)] = '\0';
        const char *values[] = {"", persist_enabled() ? "yes" : "no",
                                persist_enabled() ? "always" : "no", "1", "0", maxclients, maxbulk};
        enum { N = sizeof names / sizeof names[0] };
        int hit[N] = {0}, nhit = 0;
        for (int i = 2; i < c->argc; i++)
            for (int j = 0; j < N; j++)
                if (!hit[j] && glob_match(c->argv[i].p, c->argv[i].len, names[j], strlen(names[j]), 1)) {
                    hit[j] = 1;
                    nhit++;
                }
        reply_array(c->out, 2 * nhit);
        for (int j = 0; j < N; j++) {
            if (!hit[j]) continue;
            reply_bulk(c->out, names[j], strlen(names[j]));
            reply_bulk(c->out, values[j], strlen(values[j]));
        }
    } else if (arg_eq(sub, "set")) {
        reply_error(c->out, "ERR CONFIG SET is not supported by kv");
    } else if (arg_eq(sub, "resetstat")) {
        reply_ok(c->out);
    } else {
        reply_error(c->out, "ERR unknown CONFIG subcommand (kv supports CONFIG GET)");
    }
}

static void cmd_command(cmdctx_t *c) {
    /* No command introspection; an empty array keeps redis-cli happy. */
    if (c->argc >= 2 && arg_eq(&c->argv[1], "count")) reply_int(c->out, 0);
    else reply_array(c->out, 0);
}

static void cmd_info(cmdctx_t *c) {
    char tmp[512];
    int n = snprintf(tmp, sizeof tmp,
                     "# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\nkv_server:colo-vm kv\r\n"
                     "\r\n# Persistence\r\naof_enabled:%d\r\n"
                     "\r\n# Keyspace\r\ndb0:keys=%u,expires=0,avg_ttl=0\r\n",
                     persist_enabled(), g_db->count);
    reply_bulk(c->out, tmp, (size_t)n);
}

static void cmd_dbsize(cmdctx_t *c) { reply_int(c->out, g_db->count); }

static void cmd_flushall(cmdctx_t *c) {
    if (c->argc > 2 || (c->argc == 2 && !arg_eq(&c->argv[1], "sync") && !arg_eq(&c->argv[1], "async"))) {
        reply_error(c->out, E_SYNTAX);
        return;
    }
    dict_clear(g_db, obj_free);
    if (c->logging) persist_reset();  /* the log simply starts over: never "disk full" */
    c->logged = 1;
    reply_ok(c->out);
}

/* ---- generic keys ------------------------------------------------------------ */

static void cmd_del(cmdctx_t *c) {
    long long n = 0;
    for (int i = 1; i < c->argc; i++) n += db_delete(c->argv[i].p, c->argv[i].len);
    if (n) c->dirty = 1;
    reply_int(c->out, n);
}

static void cmd_exists(cmdctx_t *c) {
    long long n = 0;
    for (int i = 1; i < c->argc; i++) n += db_find(&c->argv[i]) != NULL;
    reply_int(c->out, n);
}

static void cmd_keys(cmdctx_t *c) {
    const arg_t *pat = &c->argv[1];
    int all = pat->len == 1 && pat->p[0] == '*';
    dent_t **hits = xmalloc(sizeof(dent_t *) * (g_db->count + 1));
    uint32_t n = 0, b = 0;
    for (dent_t *e = NULL; (e = dict_next(g_db, &b, e));)
        if (all || glob_match(pat->p, pat->len, e->key, e->klen, 0)) hits[n++] = e;
    reply_array(c->out, n);
    for (uint32_t i = 0; i < n; i++) reply_key(c->out, hits[i]);
    free(hits);
}

static void cmd_type(cmdctx_t *c) {
    dent_t *e = db_find(&c->argv[1]);
    static const char *names[] = {"none", "string", "list", "set", "hash", "zset"};
    reply_simple(c->out, names[e ? ((robj_t *)e->val)->type : 0]);
}

static void cmd_ttl(cmdctx_t *c) { reply_int(c->out, db_find(&c->argv[1]) ? -1 : -2); }

static void cmd_persist(cmdctx_t *c) { reply_int(c->out, 0); }

static void cmd_rename(cmdctx_t *c) {
    const arg_t *src = &c->argv[1], *dst = &c->argv[2];
    dent_t *e = db_find(src);
    if (!e) {
        reply_error(c->out, "ERR no such key");
        return;
    }
    if (src->len == dst->len && memcmp(src->p, dst->p, src->len) == 0) {
        reply_ok(c->out);
        return;
    }
    e = dict_unlink(g_db, src->p, src->len);
    robj_t *o = e->val;
    free(e);
    db_delete(dst->p, dst->len);
    dict_insert(g_db, dst->p, dst->len)->val = o;
    c->dirty = 1;
    reply_ok(c->out);
}

/* ---- strings ------------------------------------------------------------------ */

static void cmd_get(cmdctx_t *c) {
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_STRING, &err);
    if (err) return;
    if (o) reply_str(c->out, o->u.s);
    else reply_null(c->out);
}

/* SET key value [NX|XX] [GET] [EX s|PX ms|EXAT t|PXAT t|KEEPTTL]
 * Expiry options are validated and then ignored: kv keeps no clock so that its
 * replies stay a pure function of its input (replication determinism). */
static void cmd_set(cmdctx_t *c) {
    int nx = 0, xx = 0, get = 0, expiry = 0;
    for (int i = 3; i < c->argc; i++) {
        const arg_t *a = &c->argv[i];
        if (arg_eq(a, "nx")) nx = 1;
        else if (arg_eq(a, "xx")) xx = 1;
        else if (arg_eq(a, "get")) get = 1;
        else if (arg_eq(a, "keepttl")) {
            if (expiry) { reply_error(c->out, E_SYNTAX); return; }
            expiry = 1;
        } else if (arg_eq(a, "ex") || arg_eq(a, "px") || arg_eq(a, "exat") || arg_eq(a, "pxat")) {
            long long t;
            if (expiry || i + 1 >= c->argc) { reply_error(c->out, E_SYNTAX); return; }
            if (parse_ll(c->argv[i + 1].p, c->argv[i + 1].len, &t) != 0) { reply_error(c->out, E_NOTINT); return; }
            if (t <= 0) { reply_error(c->out, "ERR invalid expire time in 'set' command"); return; }
            expiry = 1;
            i++;
        } else {
            reply_error(c->out, E_SYNTAX);
            return;
        }
    }
    if (nx && xx) { reply_error(c->out, E_SYNTAX); return; }
    dent_t *e = db_find(&c->argv[1]);
    robj_t *old = e ? e->val : NULL;
    if (get && old && old->type != T_STRING) { reply_error(c->out, E_WRONGTYPE); return; }
    int doit = !((nx && old) || (xx && !old));
    if (get) {
        if (old) reply_str(c->out, old->u.s); /* reply before the value is replaced */
        else reply_null(c->out);
    }
    if (doit) {
        set_string(&c->argv[1], c->argv[2].p, c->argv[2].len);
        c->dirty = 1;
        if (!get) reply_ok(c->out);
    } else if (!get) {
        reply_null(c->out);
    }
}

static void cmd_setnx(cmdctx_t *c) {
    if (db_find(&c->argv[1])) {
        reply_int(c->out, 0);
        return;
    }
    set_string(&c->argv[1], c->argv[2].p, c->argv[2].len);
    c->dirty = 1;
    reply_int(c->out, 1);
}

static void cmd_getset(cmdctx_t *c) {
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_STRING, &err);
    if (err) return;
    if (o) reply_str(c->out, o->u.s);
    else reply_null(c->out);
    set_string(&c->argv[1], c->argv[2].p, c->argv[2].len);
    c->dirty = 1;
}

static void cmd_mset(cmdctx_t *c) {
    if ((c->argc - 1) % 2 != 0) {
        reply_error(c->out, "ERR wrong number of arguments for 'mset' command");
        return;
    }
    for (int i = 1; i < c->argc; i += 2) set_string(&c->argv[i], c->argv[i + 1].p, c->argv[i + 1].len);
    c->dirty = 1;
    reply_ok(c->out);
}

static void cmd_mget(cmdctx_t *c) {
    reply_array(c->out, c->argc - 1);
    for (int i = 1; i < c->argc; i++) {
        dent_t *e = db_find(&c->argv[i]);
        robj_t *o = e ? e->val : NULL;
        if (o && o->type == T_STRING) reply_str(c->out, o->u.s);
        else reply_null(c->out);
    }
}

static void cmd_append(cmdctx_t *c) {
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_STRING, &err);
    if (err) return;
    const arg_t *v = &c->argv[2];
    if (!o) {
        set_string(&c->argv[1], v->p, v->len);
        c->dirty = 1;
        reply_int(c->out, (long long)v->len);
        return;
    }
    if ((size_t)o->u.s->len + v->len > KV_MAX_BULK) {
        reply_error(c->out, E_TOOBIG);
        return;
    }
    o->u.s = str_append(o->u.s, v->p, v->len);
    c->dirty = 1;
    reply_int(c->out, o->u.s->len);
}

static void cmd_strlen(cmdctx_t *c) {
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_STRING, &err);
    if (err) return;
    reply_int(c->out, o ? o->u.s->len : 0);
}

static void incr_by(cmdctx_t *c, long long by) {
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_STRING, &err);
    if (err) return;
    long long v = 0;
    if (o && parse_ll(o->u.s->data, o->u.s->len, &v) != 0) {
        reply_error(c->out, E_NOTINT);
        return;
    }
    if ((by > 0 && v > INT64_MAX - by) || (by < 0 && v < INT64_MIN - by)) {
        reply_error(c->out, E_OVERFLOW);
        return;
    }
    v += by;
    char tmp[24];
    size_t n = fmt_ll(tmp, v);
    set_string(&c->argv[1], tmp, n);
    c->dirty = 1;
    reply_int(c->out, v);
}

static void cmd_incr(cmdctx_t *c) { incr_by(c, 1); }
static void cmd_decr(cmdctx_t *c) { incr_by(c, -1); }

static void cmd_incrby(cmdctx_t *c) {
    long long by;
    if (get_ll(c, &c->argv[2], &by) == 0) incr_by(c, by);
}

static void cmd_decrby(cmdctx_t *c) {
    long long by;
    if (get_ll(c, &c->argv[2], &by) != 0) return;
    if (by == INT64_MIN) {
        reply_error(c->out, "ERR decrement would overflow");
        return;
    }
    incr_by(c, -by);
}

/* ---- lists ------------------------------------------------------------------ */

static void push(cmdctx_t *c, int left) {
    robj_t *o = get_or_create(c, &c->argv[1], T_LIST);
    if (!o) return;
    for (int i = 2; i < c->argc; i++) list_push(o->u.l, str_new(c->argv[i].p, c->argv[i].len), left);
    c->dirty = 1;
    reply_int(c->out, o->u.l->len);
}

static void cmd_lpush(cmdctx_t *c) { push(c, 1); }
static void cmd_rpush(cmdctx_t *c) { push(c, 0); }

static void pop(cmdctx_t *c, int left) {
    long long count;
    if (get_count(c, 2, &count) != 0) return;
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_LIST, &err);
    if (err) return;
    if (!o) {
        if (count < 0) reply_null(c->out);
        else reply_null_array(c->out);
        return;
    }
    if (count < 0) {
        str_t *s = list_pop(o->u.l, left);
        reply_str(c->out, s);
        free(s);
    } else {
        long long n = count < o->u.l->len ? count : o->u.l->len;
        reply_array(c->out, n);
        for (long long i = 0; i < n; i++) {
            str_t *s = list_pop(o->u.l, left);
            reply_str(c->out, s);
            free(s);
        }
        if (n == 0) return;
    }
    c->dirty = 1;
    drop_if_empty(&c->argv[1], o);
}

static void cmd_lpop(cmdctx_t *c) { pop(c, 1); }
static void cmd_rpop(cmdctx_t *c) { pop(c, 0); }

static void cmd_llen(cmdctx_t *c) {
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_LIST, &err);
    if (!err) reply_int(c->out, o ? o->u.l->len : 0);
}

static void cmd_lindex(cmdctx_t *c) {
    long long idx;
    if (get_ll(c, &c->argv[2], &idx) != 0) return;
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_LIST, &err);
    if (err) return;
    if (!o) { reply_null(c->out); return; }
    long long len = o->u.l->len;
    if (idx < 0) idx += len;
    if (idx < 0 || idx >= len) reply_null(c->out);
    else reply_str(c->out, list_at(o->u.l, (uint32_t)idx));
}

/* Normalises a Redis [start, stop] range; returns 0 when it is empty. */
static int norm_range(long long *start, long long *stop, long long len) {
    if (*start < 0) *start += len;
    if (*stop < 0) *stop += len;
    if (*start < 0) *start = 0;
    if (*start > *stop || *start >= len) return 0;
    if (*stop >= len) *stop = len - 1;
    return 1;
}

static void cmd_lrange(cmdctx_t *c) {
    long long start, stop;
    if (get_ll(c, &c->argv[2], &start) != 0 || get_ll(c, &c->argv[3], &stop) != 0) return;
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_LIST, &err);
    if (err) return;
    if (!o || !norm_range(&start, &stop, o->u.l->len)) {
        reply_array(c->out, 0);
        return;
    }
    reply_array(c->out, stop - start + 1);
    for (long long i = start; i <= stop; i++) reply_str(c->out, list_at(o->u.l, (uint32_t)i));
}

/* ---- sets -------------------------------------------------------------------- */

static void cmd_sadd(cmdctx_t *c) {
    robj_t *o = get_or_create(c, &c->argv[1], T_SET);
    if (!o) return;
    long long added = 0;
    for (int i = 2; i < c->argc; i++) {
        int created;
        dict_upsert(o->u.set, c->argv[i].p, c->argv[i].len, &created);
        added += created;
    }
    if (added) c->dirty = 1;
    reply_int(c->out, added);
}

static void cmd_srem(cmdctx_t *c) {
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_SET, &err);
    if (err) return;
    long long n = 0;
    if (o) {
        for (int i = 2; i < c->argc; i++) {
            dent_t *e = dict_unlink(o->u.set, c->argv[i].p, c->argv[i].len);
            if (e) { free(e); n++; }
        }
        if (n) { c->dirty = 1; drop_if_empty(&c->argv[1], o); }
    }
    reply_int(c->out, n);
}

static void cmd_sismember(cmdctx_t *c) {
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_SET, &err);
    if (!err) reply_int(c->out, o && dict_find(o->u.set, c->argv[2].p, c->argv[2].len) ? 1 : 0);
}

static void cmd_scard(cmdctx_t *c) {
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_SET, &err);
    if (!err) reply_int(c->out, o ? o->u.set->count : 0);
}

static void cmd_smembers(cmdctx_t *c) {
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_SET, &err);
    if (err) return;
    if (!o) { reply_array(c->out, 0); return; }
    reply_array(c->out, o->u.set->count);
    uint32_t b = 0;
    for (dent_t *e = NULL; (e = dict_next(o->u.set, &b, e));) reply_key(c->out, e);
}

/* SPOP key [count]: removes the first members in iteration order (deterministic).
 * Logged as SREM of the removed members. */
static void cmd_spop(cmdctx_t *c) {
    long long count;
    if (get_count(c, 2, &count) != 0) return;
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_SET, &err);
    if (err) return;
    if (!o) {
        if (count < 0) reply_null(c->out);
        else reply_array(c->out, 0);
        return;
    }
    dict_t *s = o->u.set;
    long long n = count < 0 ? 1 : (count < s->count ? count : s->count);
    if (n == 0) { reply_array(c->out, 0); return; }
    /* Collect the victims first (iteration order), so the log record can be
     * reserved before anything changes. */
    dent_t **victims = xmalloc(sizeof(dent_t *) * (size_t)n);
    arg_t *rec = xmalloc(sizeof(arg_t) * (size_t)(n + 2));
    rec[0].p = "SREM";
    rec[0].len = 4;
    rec[1] = c->argv[1];
    uint32_t b = 0;
    dent_t *e = NULL;
    for (long long i = 0; i < n; i++) {
        victims[i] = e = dict_next(s, &b, e);
        rec[i + 2].p = e->key;
        rec[i + 2].len = e->klen;
    }
    int full = log_reserve(c, (int)n + 2, rec);
    if (!full) {
        log_custom(c, (int)n + 2, rec);
        if (count >= 0) reply_array(c->out, n);
        for (long long i = 0; i < n; i++) reply_bulk(c->out, victims[i]->key, victims[i]->klen);
    }
    free(rec);
    if (full) {
        free(victims);
        return;
    }
    for (long long i = 0; i < n; i++) free(dict_unlink(s, victims[i]->key, victims[i]->klen));
    free(victims);
    c->dirty = 1;
    drop_if_empty(&c->argv[1], o);
}

/* ---- hashes -------------------------------------------------------------------- */

static void hset_common(cmdctx_t *c, int is_hmset) {
    if ((c->argc - 2) % 2 != 0) {
        reply_error(c->out, is_hmset ? "ERR wrong number of arguments for 'hmset' command"
                                     : "ERR wrong number of arguments for 'hset' command");
        return;
    }
    robj_t *o = get_or_create(c, &c->argv[1], T_HASH);
    if (!o) return;
    long long added = 0;
    for (int i = 2; i < c->argc; i += 2) {
        int created;
        dent_t *e = dict_upsert(o->u.hash, c->argv[i].p, c->argv[i].len, &created);
        free(e->val);
        e->val = str_new(c->argv[i + 1].p, c->argv[i + 1].len);
        added += created;
    }
    c->dirty = 1;
    if (is_hmset) reply_ok(c->out);
    else reply_int(c->out, added);
}

static void cmd_hset(cmdctx_t *c) { hset_common(c, 0); }
static void cmd_hmset(cmdctx_t *c) { hset_common(c, 1); }

static void cmd_hget(cmdctx_t *c) {
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_HASH, &err);
    if (err) return;
    dent_t *e = o ? dict_find(o->u.hash, c->argv[2].p, c->argv[2].len) : NULL;
    if (e) reply_str(c->out, e->val);
    else reply_null(c->out);
}

static void cmd_hmget(cmdctx_t *c) {
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_HASH, &err);
    if (err) return;
    reply_array(c->out, c->argc - 2);
    for (int i = 2; i < c->argc; i++) {
        dent_t *e = o ? dict_find(o->u.hash, c->argv[i].p, c->argv[i].len) : NULL;
        if (e) reply_str(c->out, e->val);
        else reply_null(c->out);
    }
}

static void cmd_hdel(cmdctx_t *c) {
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_HASH, &err);
    if (err) return;
    long long n = 0;
    if (o) {
        for (int i = 2; i < c->argc; i++) {
            dent_t *e = dict_unlink(o->u.hash, c->argv[i].p, c->argv[i].len);
            if (e) { free(e->val); free(e); n++; }
        }
        if (n) { c->dirty = 1; drop_if_empty(&c->argv[1], o); }
    }
    reply_int(c->out, n);
}

static void cmd_hlen(cmdctx_t *c) {
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_HASH, &err);
    if (!err) reply_int(c->out, o ? o->u.hash->count : 0);
}

static void cmd_hexists(cmdctx_t *c) {
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_HASH, &err);
    if (!err) reply_int(c->out, o && dict_find(o->u.hash, c->argv[2].p, c->argv[2].len) ? 1 : 0);
}

static void hash_walk(cmdctx_t *c, int keys, int vals) {
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_HASH, &err);
    if (err) return;
    if (!o) { reply_array(c->out, 0); return; }
    reply_array(c->out, (long long)o->u.hash->count * (keys + vals));
    uint32_t b = 0;
    for (dent_t *e = NULL; (e = dict_next(o->u.hash, &b, e));) {
        if (keys) reply_key(c->out, e);
        if (vals) reply_str(c->out, e->val);
    }
}

static void cmd_hgetall(cmdctx_t *c) { hash_walk(c, 1, 1); }
static void cmd_hkeys(cmdctx_t *c) { hash_walk(c, 1, 0); }
static void cmd_hvals(cmdctx_t *c) { hash_walk(c, 0, 1); }

static void cmd_hincrby(cmdctx_t *c) {
    long long by, v = 0;
    if (get_ll(c, &c->argv[3], &by) != 0) return;
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_HASH, &err);
    if (err) return;
    dent_t *e = o ? dict_find(o->u.hash, c->argv[2].p, c->argv[2].len) : NULL;
    if (e) {
        str_t *s = e->val;
        if (parse_ll(s->data, s->len, &v) != 0) {
            reply_error(c->out, "ERR hash value is not an integer");
            return;
        }
    }
    if ((by > 0 && v > INT64_MAX - by) || (by < 0 && v < INT64_MIN - by)) {
        reply_error(c->out, E_OVERFLOW);
        return;
    }
    v += by;
    if (!o) o = get_or_create(c, &c->argv[1], T_HASH);
    if (!e) e = dict_insert(o->u.hash, c->argv[2].p, c->argv[2].len);
    char tmp[24];
    size_t n = fmt_ll(tmp, v);
    free(e->val);
    e->val = str_new(tmp, n);
    c->dirty = 1;
    reply_int(c->out, v);
}

/* ---- sorted sets ------------------------------------------------------------------ */

static znode_t *zfind(robj_t *o, const arg_t *m) {
    dent_t *e = dict_find(o->u.z->d, m->p, m->len);
    return e ? e->val : NULL;
}

static void zset_add_member(robj_t *o, const arg_t *m, double score) {
    dent_t *e = dict_insert(o->u.z->d, m->p, m->len);
    znode_t *n = xcalloc(1, sizeof(znode_t));
    n->score = score;
    n->e = e;
    e->val = n;
    zset_insert(o->u.z, n);
}

static void zset_set_score(robj_t *o, znode_t *n, double score) {
    zset_erase(o->u.z, n);
    n->score = score;
    zset_insert(o->u.z, n);
}

static void zset_remove_node(robj_t *o, znode_t *n) {
    zset_erase(o->u.z, n);
    dent_t *e = dict_unlink(o->u.z->d, n->e->key, n->e->klen);
    free(e);
    free(n);
}

/* ZADD key [NX|XX] [GT|LT] [CH] [INCR] score member [score member ...] */
static void cmd_zadd(cmdctx_t *c) {
    int nx = 0, xx = 0, gt = 0, lt = 0, ch = 0, incr = 0, i = 2;
    for (; i < c->argc; i++) {
        const arg_t *a = &c->argv[i];
        if (arg_eq(a, "nx")) nx = 1;
        else if (arg_eq(a, "xx")) xx = 1;
        else if (arg_eq(a, "gt")) gt = 1;
        else if (arg_eq(a, "lt")) lt = 1;
        else if (arg_eq(a, "ch")) ch = 1;
        else if (arg_eq(a, "incr")) incr = 1;
        else break;
    }
    int pairs = c->argc - i;
    if (pairs == 0 || pairs % 2 != 0) { reply_error(c->out, E_SYNTAX); return; }
    pairs /= 2;
    if (nx && xx) { reply_error(c->out, "ERR XX and NX options at the same time are not compatible"); return; }
    if ((gt && lt) || (gt && nx) || (lt && nx)) {
        reply_error(c->out, "ERR GT, LT, and/or NX options at the same time are not compatible");
        return;
    }
    if (incr && pairs > 1) { reply_error(c->out, "ERR INCR option supports a single increment-element pair"); return; }
    double *scores = xmalloc(sizeof(double) * (size_t)pairs);
    for (int k = 0; k < pairs; k++) {
        if (parse_double(c->argv[i + 2 * k].p, c->argv[i + 2 * k].len, &scores[k]) != 0) {
            reply_error(c->out, E_NOTFLOAT);
            free(scores);
            return;
        }
    }
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_ZSET, &err);
    if (err) { free(scores); return; }
    long long added = 0, changed = 0;
    int incr_done = 0;
    double incr_result = 0;
    for (int k = 0; k < pairs; k++) {
        const arg_t *m = &c->argv[i + 2 * k + 1];
        double s = scores[k];
        znode_t *n = o ? zfind(o, m) : NULL;
        if (n) {
            if (nx) continue;
            if (incr) {
                s = n->score + s;
                if (s != s) { reply_error(c->out, "ERR resulting score is not a number (NaN)"); free(scores); return; }
            }
            if ((gt && !(s > n->score)) || (lt && !(s < n->score))) continue;
            if (s != n->score) {
                zset_set_score(o, n, s);
                changed++;
            }
            incr_done = 1;
            incr_result = s;
        } else {
            if (xx) continue;
            if (!o) o = get_or_create(c, &c->argv[1], T_ZSET);
            zset_add_member(o, m, s);
            added++;
            incr_done = 1;
            incr_result = s;
        }
    }
    free(scores);
    if (added || changed) c->dirty = 1;
    if (incr) {
        if (incr_done) reply_double(c->out, incr_result);
        else reply_null(c->out);
    } else {
        reply_int(c->out, ch ? added + changed : added);
    }
}

static void cmd_zincrby(cmdctx_t *c) {
    double by;
    if (parse_double(c->argv[2].p, c->argv[2].len, &by) != 0) { reply_error(c->out, E_NOTFLOAT); return; }
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_ZSET, &err);
    if (err) return;
    znode_t *n = o ? zfind(o, &c->argv[3]) : NULL;
    double s = n ? n->score + by : by;
    if (s != s) { reply_error(c->out, "ERR resulting score is not a number (NaN)"); return; }
    if (n) {
        zset_set_score(o, n, s);
    } else {
        if (!o) o = get_or_create(c, &c->argv[1], T_ZSET);
        zset_add_member(o, &c->argv[3], s);
    }
    c->dirty = 1;
    reply_double(c->out, s);
}

static void cmd_zscore(cmdctx_t *c) {
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_ZSET, &err);
    if (err) return;
    znode_t *n = o ? zfind(o, &c->argv[2]) : NULL;
    if (n) reply_double(c->out, n->score);
    else reply_null(c->out);
}

static void cmd_zcard(cmdctx_t *c) {
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_ZSET, &err);
    if (!err) reply_int(c->out, o ? o->u.z->d->count : 0);
}

static void cmd_zrem(cmdctx_t *c) {
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_ZSET, &err);
    if (err) return;
    long long n = 0;
    if (o) {
        for (int i = 2; i < c->argc; i++) {
            znode_t *z = zfind(o, &c->argv[i]);
            if (z) { zset_remove_node(o, z); n++; }
        }
        if (n) { c->dirty = 1; drop_if_empty(&c->argv[1], o); }
    }
    reply_int(c->out, n);
}

static void cmd_zrank(cmdctx_t *c) {
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_ZSET, &err);
    if (err) return;
    znode_t *n = o ? zfind(o, &c->argv[2]) : NULL;
    if (n) reply_int(c->out, zset_rank(o->u.z, n));
    else reply_null(c->out);
}

/* ZRANGE key start stop [WITHSCORES] (index ranges only) */
static void cmd_zrange(cmdctx_t *c) {
    int withscores = 0;
    if (c->argc == 5 && arg_eq(&c->argv[4], "withscores")) withscores = 1;
    else if (c->argc != 4) { reply_error(c->out, E_SYNTAX); return; }
    long long start, stop;
    if (get_ll(c, &c->argv[2], &start) != 0 || get_ll(c, &c->argv[3], &stop) != 0) return;
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_ZSET, &err);
    if (err) return;
    if (!o || !norm_range(&start, &stop, o->u.z->d->count)) { reply_array(c->out, 0); return; }
    reply_array(c->out, (stop - start + 1) * (withscores ? 2 : 1));
    for (long long r = start; r <= stop; r++) {
        znode_t *n = zset_at(o->u.z, (uint32_t)r);
        reply_key(c->out, n->e);
        if (withscores) reply_double(c->out, n->score);
    }
}

static void zpop(cmdctx_t *c, int max) {
    long long count;
    if (get_count(c, 2, &count) != 0) return;
    int err;
    robj_t *o = get_typed(c, &c->argv[1], T_ZSET, &err);
    if (err) return;
    if (count < 0) count = 1;
    long long n = o ? (count < o->u.z->d->count ? count : o->u.z->d->count) : 0;
    reply_array(c->out, 2 * n);
    for (long long i = 0; i < n; i++) {
        znode_t *z = max ? zset_max(o->u.z) : zset_min(o->u.z);
        reply_key(c->out, z->e);
        reply_double(c->out, z->score);
        zset_remove_node(o, z);
    }
    if (n) { c->dirty = 1; drop_if_empty(&c->argv[1], o); }
}

static void cmd_zpopmin(cmdctx_t *c) { zpop(c, 0); }
static void cmd_zpopmax(cmdctx_t *c) { zpop(c, 1); }

/* ---- table & dispatch ----------------------------------------------------------- */

enum {
    F_WRITE = 1,  /* modifies data: logged (when dirty) and refused when the disk is full */
    F_FREES = 2,  /* only removes data: may run on a full disk by compacting afterwards */
};

typedef struct {
    const char *name;
    void (*fn)(cmdctx_t *);
    int arity;    /* > 0: exact argc; < 0: at least -arity */
    int flags;
} cmd_t;

static const cmd_t commands[] = {
    {"ping", cmd_ping, -1, 0},
    {"time", cmd_time, 1, 0},
    {"echo", cmd_echo, 2, 0},
    {"quit", cmd_quit, -1, 0},
    {"select", cmd_select, 2, 0},
    {"config", cmd_config, -2, 0},
    {"command", cmd_command, -1, 0},
    {"info", cmd_info, -1, 0},
    {"dbsize", cmd_dbsize, 1, 0},
    {"flushall", cmd_flushall, -1, F_WRITE},
    {"flushdb", cmd_flushall, -1, F_WRITE},
    {"del", cmd_del, -2, F_WRITE | F_FREES},
    {"unlink", cmd_del, -2, F_WRITE | F_FREES},
    {"exists", cmd_exists, -2, 0},
    {"keys", cmd_keys, 2, 0},
    {"type", cmd_type, 2, 0},
    {"ttl", cmd_ttl, 2, 0},
    {"pttl", cmd_ttl, 2, 0},
    {"persist", cmd_persist, 2, 0},
    {"rename", cmd_rename, 3, F_WRITE},
    {"get", cmd_get, 2, 0},
    {"set", cmd_set, -3, F_WRITE},
    {"setnx", cmd_setnx, 3, F_WRITE},
    {"getset", cmd_getset, 3, F_WRITE},
    {"mset", cmd_mset, -3, F_WRITE},
    {"mget", cmd_mget, -2, 0},
    {"append", cmd_append, 3, F_WRITE},
    {"strlen", cmd_strlen, 2, 0},
    {"incr", cmd_incr, 2, F_WRITE},
    {"decr", cmd_decr, 2, F_WRITE},
    {"incrby", cmd_incrby, 3, F_WRITE},
    {"decrby", cmd_decrby, 3, F_WRITE},
    {"lpush", cmd_lpush, -3, F_WRITE},
    {"rpush", cmd_rpush, -3, F_WRITE},
    {"lpop", cmd_lpop, -2, F_WRITE},
    {"rpop", cmd_rpop, -2, F_WRITE},
    {"llen", cmd_llen, 2, 0},
    {"lindex", cmd_lindex, 3, 0},
    {"lrange", cmd_lrange, 4, 0},
    {"sadd", cmd_sadd, -3, F_WRITE},
    {"srem", cmd_srem, -3, F_WRITE},
    {"sismember", cmd_sismember, 3, 0},
    {"scard", cmd_scard, 2, 0},
    {"smembers", cmd_smembers, 2, 0},
    {"spop", cmd_spop, -2, F_WRITE},
    {"hset", cmd_hset, -4, F_WRITE},
    {"hmset", cmd_hmset, -4, F_WRITE},
    {"hget", cmd_hget, 3, 0},
    {"hmget", cmd_hmget, -3, 0},
    {"hdel", cmd_hdel, -3, F_WRITE},
    {"hlen", cmd_hlen, 2, 0},
    {"hexists", cmd_hexists, 3, 0},
    {"hgetall", cmd_hgetall, 2, 0},
    {"hkeys", cmd_hkeys, 2, 0},
    {"hvals", cmd_hvals, 2, 0},
    {"hincrby", cmd_hincrby, 4, F_WRITE},
    {"zadd", cmd_zadd, -4, F_WRITE},
    {"zincrby", cmd_zincrby, 4, F_WRITE},
    {"zscore", cmd_zscore, 3, 0},
    {"zcard", cmd_zcard, 2, 0},
    {"zrem", cmd_zrem, -3, F_WRITE},
    {"zrank", cmd_zrank, 3, 0},
    {"zrange", cmd_zrange, -4, 0},
    {"zpopmin", cmd_zpopmin, -2, F_WRITE},
    {"zpopmax", cmd_zpopmax, -2, F_WRITE},
};

static dict_t *g_cmds;

void commands_init(void) {
    g_db = dict_new();
    g_cmds = dict_new();
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        dict_insert(g_cmds, commands[i].name, strlen(commands[i].name))->val = (void *)&commands[i];
}

static const cmd_t *lookup_command(const arg_t *name) {
    char low[24];
    if (name->len >= sizeof low) return NULL;
    for (size_t i = 0; i < name->len; i++) {
        char ch = name->p[i];
        low[i] = (ch >= 'A' && ch <= 'Z') ? (char)(ch + 32) : ch;
    }
    dent_t *e = dict_find(g_cmds, low, name->len);
    return e ? e->val : NULL;
}

static void reply_unknown(buf_t *o, const arg_t *name) {
    char msg[200];
    size_t n = name->len > 128 ? 128 : name->len;
    int k = snprintf(msg, sizeof msg, "ERR unknown command '");
    for (size_t i = 0; i < n; i++) {
        char ch = name->p[i];
        msg[k++] = (ch == '\r' || ch == '\n') ? ' ' : ch;
    }
    msg[k++] = '\'';
    msg[k] = '\0';
    reply_error(o, msg);
}

/* DEL/UNLINK on a disk too full even for compaction: apply it, then write a
 * snapshot of what is left, provided that fits. */
static void del_on_full_disk(cmdctx_t *c, const cmd_t *cmd) {
    dent_t **found = xmalloc(sizeof(dent_t *) * (size_t)c->argc);
    int n = 0;
    for (int i = 1; i < c->argc; i++) {
        dent_t *e = db_find(&c->argv[i]);
        int dup = 0;
        for (int k = 0; k < n && !dup; k++) dup = found[k] == e;
        if (e && !dup) found[n++] = e;
    }
    if (n == 0) { /* nothing to delete, nothing to log */
        free(found);
        reply_int(c->out, 0);
        return;
    }
    uint64_t total = persist_snapshot_size();
    for (int k = 0; k < n; k++) total -= persist_key_snapshot_size(found[k]);
    free(found);
    if (!persist_snapshot_fits(total)) {
        reply_error(c->out, "ERR disk full");
        return;
    }
    c->logging = 0;
    cmd->fn(c);
    persist_compact();
}

void command_exec(cmdctx_t *c) {
    c->dirty = c->logged = c->logging = 0;
    const cmd_t *cmd = lookup_command(&c->argv[0]);
    if (!cmd) {
        reply_unknown(c->out, &c->argv[0]);
        return;
    }
    if ((cmd->arity > 0 && c->argc != cmd->arity) || (cmd->arity < 0 && c->argc < -cmd->arity)) {
        char msg[96];
        snprintf(msg, sizeof msg, "ERR wrong number of arguments for '%s' command", cmd->name);
        reply_error(c->out, msg);
        return;
    }
    if ((cmd->flags & F_WRITE) && !c->replaying && persist_enabled()) {
        if (cmd->fn != cmd_flushall && persist_reserve(persist_record_size(c->argc, c->argv)) != 0) {
            if (cmd->flags & F_FREES) del_on_full_disk(c, cmd);
            else reply_error(c->out, "ERR disk full");
            return;
        }
        c->logging = 1;
    }
    cmd->fn(c);
    if (c->logging && c->dirty && !c->logged) persist_append(c->argc, c->argv);
}
