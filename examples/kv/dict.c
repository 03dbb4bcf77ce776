/*
 * kv - chained hash table with power-of-two sizing.
 *
 * Grows (x2) when count exceeds the bucket count, shrinks (/4) when the load
 * falls below 1/8. Iteration order is bucket order, chain order within a
 * bucket; it depends only on the sequence of operations (the hash has no seed),
 * so two replicas fed the same commands iterate identically.
 */
#include <stdlib.h>
#include <string.h>

#include "kv.h"

#define DICT_MIN 8u

dict_t *dict_new(void) {
    return xcalloc(1, sizeof(dict_t));
}

static void dict_resize(dict_t *d, uint32_t size) {
    dent_t **tab = xcalloc(size, sizeof(dent_t *));
    for (uint32_t i = 0; i < d->size; i++) {
        dent_t *e = d->tab[i];
        while (e) {
            dent_t *next = e->next;
            uint32_t b = e->hash & (size - 1);
            e->next = tab[b];
            tab[b] = e;
            e = next;
        }
    }
    free(d->tab);
    d->tab = tab;
    d->size = size;
    d->scan_hint = 0;
}

dent_t *dict_find(const dict_t *d, const char *k, size_t klen) {
    if (d->size == 0) return NULL;
    uint32_t h = hash_bytes(k, klen);
    for (dent_t *e = d->tab[h & (d->size - 1)]; e; e = e->next)
        if (e->hash == h && e->klen == klen && memcmp(e->key, k, klen) == 0) return e;
    return NULL;
}

dent_t *dict_insert(dict_t *d, const char *k, size_t klen) {
    if (d->size == 0) dict_resize(d, DICT_MIN);
    else if (d->count >= d->size && d->size < (1u << 31)) dict_resize(d, d->size * 2);
    dent_t *e = xmalloc(sizeof(dent_t) + klen + 1);
    e->hash = hash_bytes(k, klen);
    e->klen = (uint32_t)klen;
    e->val = NULL;
    memcpy(e->key, k, klen);
    e->key[klen] = '\0';
    uint32_t b = e->hash & (d->size - 1);
    e->next = d->tab[b];
    d->tab[b] = e;
    if (b < d->scan_hint) d->scan_hint = b;
    d->count++;
    return e;
}

dent_t *dict_upsert(dict_t *d, const char *k, size_t klen, int *created) {
    dent_t *e = dict_find(d, k, klen);
    *created = e == NULL;
    return e ? e : dict_insert(d, k, klen);
}

dent_t *dict_unlink(dict_t *d, const char *k, size_t klen) {
    if (d->size == 0) return NULL;
    uint32_t h = hash_bytes(k, klen);
    dent_t **pp = &d->tab[h & (d->size - 1)];
    for (; *pp; pp = &(*pp)->next) {
        dent_t *e = *pp;
        if (e->hash == h && e->klen == klen && memcmp(e->key, k, klen) == 0) {
            *pp = e->next;
            d->count--;
            if (d->size > DICT_MIN && d->count < d->size / 8) dict_resize(d, d->size / 4 < DICT_MIN ? DICT_MIN : d->size / 4);
            return e;
        }
    }
    return NULL;
}

dent_t *dict_first(dict_t *d) {
    if (d->count == 0) return NULL;
    for (uint32_t i = d->scan_hint; i < d->size; i++) {
        if (d->tab[i]) {
            d->scan_hint = i;
            return d->tab[i];
        }
    }
    return NULL; /* unreachable while count > 0 */
}

dent_t *dict_next(const dict_t *d, uint32_t *bucket, dent_t *prev) {
    if (prev && prev->next) return prev->next;
    uint32_t i = prev ? *bucket + 1 : *bucket;
    for (; i < d->size; i++) {
        if (d->tab[i]) {
            *bucket = i;
            return d->tab[i];
        }
    }
    *bucket = d->size;
    return NULL;
}

void dict_clear(dict_t *d, void (*fn)(void *)) {
    for (uint32_t i = 0; i < d->size; i++) {
        dent_t *e = d->tab[i];
        while (e) {
            dent_t *next = e->next;
            if (fn) fn(e->val);
            free(e);
            e = next;
        }
    }
    free(d->tab);
    d->tab = NULL;
    d->size = d->count = d->scan_hint = 0;
}

void dict_free(dict_t *d, void (*fn)(void *)) {
    if (!d) return;
    dict_clear(d, fn);
    free(d);
}
