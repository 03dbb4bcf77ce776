/*
 * kv - a small Redis-protocol key-value server, written as a colo-vm guest.
 *
 * Shared declarations. Everything except platform_*.c is identical in the
 * WebAssembly (WASI) build and the native (POSIX) test build.
 */
#ifndef KV_H
#define KV_H

#include <stddef.h>
#include <stdint.h>

/* ---- limits ------------------------------------------------------------ */

#define KV_MAX_BULK        (64u << 20)            /* one argument / one string value */
#define KV_MAX_REQUEST     (KV_MAX_BULK + (1u << 20)) /* raw bytes of one request */
#define KV_MAX_ARGS        (1024 * 1024)          /* arguments in one request */
#define KV_MAX_INLINE      (64u << 10)            /* one inline command line */
#define KV_MAX_CLIENTS     10000
#define KV_OUT_SOFT_LIMIT  (1u << 20)             /* stop executing a client's requests while its
                                                     unsent replies exceed this */

/* ---- growable byte buffer ---------------------------------------------- */

typedef struct {
    char *p;
    size_t len, cap;
} buf_t;

void buf_reserve(buf_t *b, size_t extra);   /* ensures cap >= len + extra */
void buf_append(buf_t *b, const void *data, size_t n);
void buf_putc(buf_t *b, char c);
void buf_free(buf_t *b);

/* ---- strings (values, list elements, hash values) ------------------------ */

typedef struct {
    uint32_t len, cap;
    char data[];   /* len bytes, then a NUL (not counted) */
} str_t;

str_t *str_new(const char *p, size_t len);
str_t *str_append(str_t *s, const char *p, size_t len);  /* may reallocate */

/* ---- command arguments --------------------------------------------------- */

typedef struct {
    const char *p;
    size_t len;
} arg_t;

/* ---- utilities ----------------------------------------------------------- */

void *xmalloc(size_t n);
void *xrealloc(void *p, size_t n);
void *xcalloc(size_t n, size_t sz);
uint32_t hash_bytes(const void *p, size_t len);
uint32_t crc32_update(uint32_t crc, const void *p, size_t len);
/* Strict decimal int64 parse (Redis rules: no spaces, no '+', no leading zeros). */
int parse_ll(const char *p, size_t len, long long *out);
/* Double parse accepting what strtod accepts (incl. inf), rejecting NaN and junk. */
int parse_double(const char *p, size_t len, double *out);
size_t fmt_ll(char *dst, long long v);           /* dst >= 21 bytes, no NUL */
size_t fmt_double(char *dst, double v);          /* dst >= 32 bytes, shortest round-trip, NUL */
int glob_match(const char *pat, size_t plen, const char *s, size_t slen, int nocase);
int arg_eq(const arg_t *a, const char *lit);     /* case-insensitive */

/* ---- hash table ---------------------------------------------------------- */

typedef struct dent {
    struct dent *next;
    uint32_t hash;
    uint32_t klen;
    void *val;          /* keyspace: robj*, hash: str_t*, zset: znode*, set: unused */
    char key[];
} dent_t;

typedef struct {
    dent_t **tab;
    uint32_t size;      /* 0 or a power of two */
    uint32_t count;
    uint32_t scan_hint; /* no entries in buckets below this index */
} dict_t;

dict_t *dict_new(void);
dent_t *dict_find(const dict_t *d, const char *k, size_t klen);
/* Inserts a new entry (caller checked absence); val is NULL. */
dent_t *dict_insert(dict_t *d, const char *k, size_t klen);
/* Finds or inserts; *created tells which. */
dent_t *dict_upsert(dict_t *d, const char *k, size_t klen, int *created);
/* Unlinks the entry and returns it (caller frees value, then free()s entry). */
dent_t *dict_unlink(dict_t *d, const char *k, size_t klen);
dent_t *dict_first(dict_t *d);  /* first entry in iteration order, NULL if empty */
/* Iteration: i = 0, e = NULL; while ((e = dict_next(d, &i, e))) ...  No mutation meanwhile. */
dent_t *dict_next(const dict_t *d, uint32_t *bucket, dent_t *prev);
/* Frees all entries; calls fn(entry->val) for each if fn is set. */
void dict_clear(dict_t *d, void (*fn)(void *));
void dict_free(dict_t *d, void (*fn)(void *));

/* ---- values -------------------------------------------------------------- */

enum { T_STRING = 1, T_LIST, T_SET, T_HASH, T_ZSET };

typedef struct {
    str_t **a;
    uint32_t cap, head, len;  /* ring buffer, cap a power of two */
} list_t;

typedef struct znode {
    double score;
    dent_t *e;            /* member bytes live in the zset's dict entry */
    struct znode *l, *r;
    uint32_t prio, size;  /* treap priority (from the member hash), subtree size */
} znode_t;

typedef struct {
    dict_t *d;       /* member -> znode */
    znode_t *root;   /* ordered by (score, member) */
} zset_t;

typedef struct {
    int type;
    union {
        str_t *s;
        list_t *l;
        dict_t *set;
        dict_t *hash;
        zset_t *z;
    } u;
} robj_t;

robj_t *obj_new(int type);
void obj_free(void *o);
void hashval_free(void *v);

void list_push(list_t *l, str_t *s, int left);
str_t *list_pop(list_t *l, int left);
str_t *list_at(const list_t *l, uint32_t i);

int zset_cmp(const znode_t *a, const znode_t *b);
void zset_insert(zset_t *z, znode_t *n);
void zset_erase(zset_t *z, znode_t *n);
znode_t *zset_at(const zset_t *z, uint32_t rank);   /* 0-based */
uint32_t zset_rank(const zset_t *z, const znode_t *n);
znode_t *zset_min(const zset_t *z);
znode_t *zset_max(const zset_t *z);

/* ---- keyspace ------------------------------------------------------------- */

extern dict_t *g_db;

/* ---- commands ------------------------------------------------------------- */

typedef struct {
    int argc;
    arg_t *argv;
    buf_t *out;        /* replies are appended here */
    int replaying;     /* 1 while rebuilding from the disk log */
    int close_after;   /* set by QUIT */
    /* set by command_exec / the handlers: */
    int logging;       /* this command's effect must be appended to the disk log */
    int dirty;         /* the handler changed data (so the command gets logged) */
    int logged;        /* the handler wrote its own (rewritten) log record */
} cmdctx_t;

void commands_init(void);
void command_exec(cmdctx_t *c);

/* Reply helpers. */
void reply_simple(buf_t *o, const char *s);
void reply_error(buf_t *o, const char *s);     /* s without leading '-' */
void reply_int(buf_t *o, long long v);
void reply_bulk(buf_t *o, const char *p, size_t len);
void reply_null(buf_t *o);
void reply_array(buf_t *o, long long n);
void reply_double(buf_t *o, double d);

/* ---- persistence (disk log) ------------------------------------------------ */

/* Opens fd 4 / the disk file and replays it. Returns 0 (memory-only when no disk). */
int persist_open(void);
int persist_enabled(void);
uint64_t persist_record_size(int argc, const arg_t *argv);
/* Makes room for a record of `size` bytes (compacting if needed). 0 = ok, -1 = disk full. */
int persist_reserve(uint64_t size);
/* Appends the record to the pending batch (space must have been reserved). */
void persist_append(int argc, const arg_t *argv);
/* Writes the pending batch and the header. Must run before replies are sent. Exits on I/O error. */
void persist_flush(void);
/* FLUSHALL: empties the log (new epoch), written immediately. */
void persist_reset(void);
/* Size of the snapshot records for one key (as written by compaction). */
uint64_t persist_key_snapshot_size(const dent_t *key);
/* Would a snapshot of `bytes` fit the disk? */
int persist_snapshot_fits(uint64_t bytes);
uint64_t persist_snapshot_size(void);
/* Rewrites the log as a snapshot of the current data now (caller checked it fits). */
void persist_compact(void);

#endif
