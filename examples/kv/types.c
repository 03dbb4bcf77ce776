/* kv - value objects: lists (ring buffers) and sorted sets (treaps). */
#include <stdlib.h>
#include <string.h>

#include "kv.h"

robj_t *obj_new(int type) {
    robj_t *o = xcalloc(1, sizeof(robj_t));
    o->type = type;
    switch (type) {
    case T_LIST: o->u.l = xcalloc(1, sizeof(list_t)); break;
    case T_SET: o->u.set = dict_new(); break;
    case T_HASH: o->u.hash = dict_new(); break;
    case T_ZSET:
        o->u.z = xcalloc(1, sizeof(zset_t));
        o->u.z->d = dict_new();
        break;
    default: break;
    }
    return o;
}

void hashval_free(void *v) { free(v); }

static void znode_free(void *v) { free(v); }

void obj_free(void *p) {
    robj_t *o = p;
    if (!o) return;
    switch (o->type) {
    case T_STRING: free(o->u.s); break;
    case T_LIST:
        for (uint32_t i = 0; i < o->u.l->len; i++) free(list_at(o->u.l, i));
        free(o->u.l->a);
        free(o->u.l);
        break;
    case T_SET: dict_free(o->u.set, NULL); break;
    case T_HASH: dict_free(o->u.hash, hashval_free); break;
    case T_ZSET:
        dict_free(o->u.z->d, znode_free); /* every znode is owned by exactly one entry */
        free(o->u.z);
        break;
    }
    free(o);
}

/* ---- list ---------------------------------------------------------------- */

static void list_grow(list_t *l) {
    uint32_t ncap = l->cap ? l->cap * 2 : 8;
    str_t **a = xmalloc(sizeof(str_t *) * ncap);
    for (uint32_t i = 0; i < l->len; i++) a[i] = l->a[(l->head + i) & (l->cap - 1)];
    free(l->a);
    l->a = a;
    l->cap = ncap;
    l->head = 0;
}

void list_push(list_t *l, str_t *s, int left) {
    if (l->len == l->cap) list_grow(l);
    if (left) {
        l->head = (l->head - 1) & (l->cap - 1);
        l->a[l->head] = s;
    } else {
        l->a[(l->head + l->len) & (l->cap - 1)] = s;
    }
    l->len++;
}

str_t *list_pop(list_t *l, int left) {
    if (l->len == 0) return NULL;
    str_t *s;
    if (left) {
        s = l->a[l->head];
        l->head = (l->head + 1) & (l->cap - 1);
    } else {
        s = l->a[(l->head + l->len - 1) & (l->cap - 1)];
    }
    l->len--;
    if (l->cap > 64 && l->len < l->cap / 8) {
        /* shrink: compact into a smaller ring */
        uint32_t ncap = l->cap / 4;
        str_t **a = xmalloc(sizeof(str_t *) * ncap);
        for (uint32_t i = 0; i < l->len; i++) a[i] = l->a[(l->head + i) & (l->cap - 1)];
        free(l->a);
        l->a = a;
        l->cap = ncap;
        l->head = 0;
    }
    return s;
}

str_t *list_at(const list_t *l, uint32_t i) {
    return l->a[(l->head + i) & (l->cap - 1)];
}

/* ---- sorted set treap ------------------------------------------------------ */
/* Ordered by (score, member bytes); priorities come from the member hash, so the
 * shape is a deterministic function of the contents. */

int zset_cmp(const znode_t *a, const znode_t *b) {
    if (a->score < b->score) return -1;
    if (a->score > b->score) return 1;
    size_t la = a->e->klen, lb = b->e->klen;
    int c = memcmp(a->e->key, b->e->key, la < lb ? la : lb);
    if (c) return c < 0 ? -1 : 1;
    return la < lb ? -1 : la > lb ? 1 : 0;
}

static uint32_t zsz(const znode_t *n) { return n ? n->size : 0; }
static void zupd(znode_t *n) { n->size = 1 + zsz(n->l) + zsz(n->r); }

/* Splits t into nodes < key (*l) and nodes >= key (*r). */
static void zsplit(znode_t *t, const znode_t *key, znode_t **l, znode_t **r) {
    if (!t) {
        *l = *r = NULL;
    } else if (zset_cmp(t, key) < 0) {
        zsplit(t->r, key, &t->r, r);
        zupd(t);
        *l = t;
    } else {
        zsplit(t->l, key, l, &t->l);
        zupd(t);
        *r = t;
    }
}

static znode_t *zmerge(znode_t *a, znode_t *b) {
    if (!a) return b;
    if (!b) return a;
    if (a->prio > b->prio) {
        a->r = zmerge(a->r, b);
        zupd(a);
        return a;
    }
    b->l = zmerge(a, b->l);
    zupd(b);
    return b;
}

static znode_t *zins(znode_t *t, znode_t *n) {
    if (!t) return n;
    if (n->prio > t->prio) {
        zsplit(t, n, &n->l, &n->r);
        zupd(n);
        return n;
    }
    if (zset_cmp(n, t) < 0) t->l = zins(t->l, n);
    else t->r = zins(t->r, n);
    zupd(t);
    return t;
}

static znode_t *zdel(znode_t *t, znode_t *n) {
    if (!t) return NULL;
    if (t == n) return zmerge(t->l, t->r);
    if (zset_cmp(n, t) < 0) t->l = zdel(t->l, n);
    else t->r = zdel(t->r, n);
    zupd(t);
    return t;
}

void zset_insert(zset_t *z, znode_t *n) {
    n->l = n->r = NULL;
    n->size = 1;
    n->prio = n->e->hash * 2654435761u;
    z->root = zins(z->root, n);
}

void zset_erase(zset_t *z, znode_t *n) {
    z->root = zdel(z->root, n);
    n->l = n->r = NULL;
}

znode_t *zset_at(const zset_t *z, uint32_t rank) {
    znode_t *t = z->root;
    while (t) {
        uint32_t ls = zsz(t->l);
        if (rank < ls) t = t->l;
        else if (rank == ls) return t;
        else { rank -= ls + 1; t = t->r; }
    }
    return NULL;
}

uint32_t zset_rank(const zset_t *z, const znode_t *n) {
    uint32_t r = 0;
    const znode_t *t = z->root;
    while (t) {
        int c = zset_cmp(n, t);
        if (c < 0) t = t->l;
        else if (c == 0) return r + zsz(t->l);
        else { r += zsz(t->l) + 1; t = t->r; }
    }
    return r;
}

znode_t *zset_min(const zset_t *z) {
    znode_t *t = z->root;
    while (t && t->l) t = t->l;
    return t;
}

znode_t *zset_max(const zset_t *z) {
    znode_t *t = z->root;
    while (t && t->r) t = t->r;
    return t;
}
