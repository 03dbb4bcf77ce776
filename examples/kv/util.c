/* kv - buffers, strings, number parsing/formatting, hashing, glob matching. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kv.h"

static void oom(size_t n) {
    fprintf(stderr, "kv: out of memory allocating %zu bytes\n", n);
    fflush(stderr);
    abort();
}

void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) oom(n);
    return p;
}

void *xrealloc(void *p, size_t n) {
    p = realloc(p, n ? n : 1);
    if (!p) oom(n);
    return p;
}

void *xcalloc(size_t n, size_t sz) {
    void *p = calloc(n ? n : 1, sz ? sz : 1);
    if (!p) oom(n * sz);
    return p;
}

/* ---- buf_t ---------------------------------------------------------------- */

void buf_reserve(buf_t *b, size_t extra) {
    if (b->cap - b->len >= extra) return;
    size_t want = b->len + extra;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < want) cap = cap < (1u << 20) ? cap * 2 : cap + cap / 2;
    b->p = xrealloc(b->p, cap);
    b->cap = cap;
}

void buf_append(buf_t *b, const void *data, size_t n) {
    buf_reserve(b, n);
    if (n) memcpy(b->p + b->len, data, n);
    b->len += n;
}

void buf_putc(buf_t *b, char c) {
    if (b->len == b->cap) buf_reserve(b, 1);
    b->p[b->len++] = c;
}

void buf_free(buf_t *b) {
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* ---- str_t ---------------------------------------------------------------- */

str_t *str_new(const char *p, size_t len) {
    str_t *s = xmalloc(sizeof(str_t) + len + 1);
    s->len = s->cap = (uint32_t)len;
    if (len) memcpy(s->data, p, len);
    s->data[len] = '\0';
    return s;
}

str_t *str_append(str_t *s, const char *p, size_t len) {
    size_t need = (size_t)s->len + len;
    if (need > s->cap) {
        size_t cap = need < (1u << 20) ? need * 2 : need + (1u << 20);
        s = xrealloc(s, sizeof(str_t) + cap + 1);
        s->cap = (uint32_t)cap;
    }
    memcpy(s->data + s->len, p, len);
    s->len = (uint32_t)need;
    s->data[need] = '\0';
    return s;
}

/* ---- hashing / checksums ---------------------------------------------------- */

/* FNV-1a followed by a murmur-style finaliser so the low bits (bucket index) are mixed. */
uint32_t hash_bytes(const void *p, size_t len) {
    const unsigned char *s = p;
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++) {
        h ^= s[i];
        h *= 16777619u;
    }
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    return h;
}

static uint32_t crc_table[256];
static int crc_ready;

uint32_t crc32_update(uint32_t crc, const void *p, size_t len) {
    if (!crc_ready) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
            crc_table[i] = c;
        }
        crc_ready = 1;
    }
    const unsigned char *s = p;
    crc = ~crc;
    for (size_t i = 0; i < len; i++) crc = crc_table[(crc ^ s[i]) & 0xff] ^ (crc >> 8);
    return ~crc;
}

/* ---- numbers ------------------------------------------------------------- */

int parse_ll(const char *p, size_t len, long long *out) {
    if (len == 0 || len > 20) return -1;
    size_t i = 0;
    int neg = 0;
    if (p[0] == '-') {
        neg = 1;
        i = 1;
        if (len == 1) return -1;
    }
    if (p[i] == '0') {
        if (len == 1) { *out = 0; return 0; }
        return -1; /* leading zero or "-0" */
    }
    unsigned long long v = 0;
    for (; i < len; i++) {
        if (p[i] < '0' || p[i] > '9') return -1;
        unsigned d = (unsigned)(p[i] - '0');
        if (v > (18446744073709551615ull - d) / 10) return -1;
        v = v * 10 + d;
    }
    if (neg) {
        if (v > 9223372036854775808ull) return -1;
        *out = (long long)(0 - v);
    } else {
        if (v > 9223372036854775807ull) return -1;
        *out = (long long)v;
    }
    return 0;
}

int parse_double(const char *p, size_t len, double *out) {
    char tmp[320];
    if (len == 0 || len >= sizeof tmp) return -1;
    if (p[0] == ' ' || p[0] == '\t' || p[0] == '\n' || p[0] == '\r') return -1;
    memcpy(tmp, p, len);
    tmp[len] = '\0';
    char *end;
    errno = 0;
    double d = strtod(tmp, &end);
    if (end != tmp + len || isnan(d)) return -1;
    if (errno == ERANGE && (isinf(d) || d == 0)) return -1; /* "1e400", "1e-400" (explicit "inf" is fine) */
    *out = d;
    return 0;
}

size_t fmt_ll(char *dst, long long v) {
    char tmp[24];
    size_t n = 0;
    unsigned long long u = v < 0 ? 0 - (unsigned long long)v : (unsigned long long)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    size_t k = 0;
    if (v < 0) dst[k++] = '-';
    while (n) dst[k++] = tmp[--n];
    return k;
}

size_t fmt_double(char *dst, double v) {
    if (isinf(v)) {
        strcpy(dst, v > 0 ? "inf" : "-inf");
        return strlen(dst);
    }
    /* Shortest of %.15g .. %.17g that reads back as the same double. */
    for (int prec = 15; prec <= 17; prec++) {
        int n = snprintf(dst, 32, "%.*g", prec, v);
        if (prec == 17 || strtod(dst, NULL) == v) return (size_t)n;
    }
    return strlen(dst);
}

/* ---- glob ---------------------------------------------------------------- */

static int lower(int c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

/* Matches one pattern element at pat[*pi] against c; advances *pi past it.
 * Returns 1 if it matches. The element is not '*'. */
static int glob_one(const char *pat, size_t plen, size_t *pi, unsigned char c, int nocase) {
    size_t i = *pi;
    unsigned char pc = (unsigned char)pat[i];
    if (pc == '?') { *pi = i + 1; return 1; }
    if (pc == '[') {
        size_t j = i + 1;
        int neg = 0, hit = 0;
        if (j < plen && pat[j] == '^') { neg = 1; j++; }
        for (; j < plen && pat[j] != ']'; j++) {
            if (pat[j] == '\\' && j + 1 < plen) {
                j++;
                if ((unsigned char)pat[j] == c) hit = 1;
            } else if (j + 2 < plen && pat[j + 1] == '-' && pat[j + 2] != ']') {
                int a = (unsigned char)pat[j], b = (unsigned char)pat[j + 2], x = c;
                if (a > b) { int t = a; a = b; b = t; }
                if (nocase) { a = lower(a); b = lower(b); x = lower(x); }
                if (x >= a && x <= b) hit = 1;
                j += 2;
            } else {
                int a = (unsigned char)pat[j], x = c;
                if (nocase) { a = lower(a); x = lower(x); }
                if (a == x) hit = 1;
            }
        }
        *pi = j < plen ? j + 1 : j; /* past ']' (an unterminated class runs to the end) */
        return neg ? !hit : hit;
    }
    if (pc == '\\' && i + 1 < plen) { i++; pc = (unsigned char)pat[i]; }
    *pi = i + 1;
    return nocase ? lower(pc) == lower(c) : pc == c;
}

int glob_match(const char *pat, size_t plen, const char *s, size_t slen, int nocase) {
    size_t pi = 0, si = 0;
    size_t star_p = (size_t)-1, star_s = 0;
    while (si < slen) {
        if (pi < plen && pat[pi] == '*') {
            while (pi < plen && pat[pi] == '*') pi++;
            if (pi == plen) return 1;
            star_p = pi;
            star_s = si;
            continue;
        }
        if (pi < plen) {
            size_t np = pi;
            if (glob_one(pat, plen, &np, (unsigned char)s[si], nocase)) {
                pi = np;
                si++;
                continue;
            }
        }
        if (star_p == (size_t)-1) return 0;
        pi = star_p;
        si = ++star_s;
    }
    while (pi < plen && pat[pi] == '*') pi++;
    return pi == plen;
}

int arg_eq(const arg_t *a, const char *lit) {
    size_t n = strlen(lit);
    if (a->len != n) return 0;
    for (size_t i = 0; i < n; i++)
        if (lower((unsigned char)a->p[i]) != lower((unsigned char)lit[i])) return 0;
    return 1;
}
