/*
 * fill - an idle guest with a given amount of RAM in a given state, for the migration
 * benchmarks.
 *
 * Usage: fill SIZE MODE      SIZE in bytes with an optional K, M or G suffix (powers of
 *                            1024); MODE is one of
 *   data       every 4 KiB page filled with non-zero bytes (a different value per page);
 *   zero       every page written with zeros (RAM the guest touched, all zero);
 *   untouched  allocated (memory.grow) and never written;
 *   grow       allocated 1 MiB at a time, every 10 ms (memory grows while the guest runs),
 *              each chunk filled with its number (1, 2, ...) as soon as it is allocated.
 *
 * Prints exactly one line, "fill ready start=0x<hex> size=<bytes> mode=<mode>" (for grow:
 * at the start, with start=0x0), then sleeps in a loop (one poll_oneoff per second): the
 * guest dirties nothing while it idles.
 */
#include <ctype.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PAGE 4096u

/* Allocations escape through here, so that the compiler cannot drop them as unused. */
static uint8_t *volatile keep;

static size_t parse_size(const char *s) {
    if (!isdigit((unsigned char)*s)) return 0;
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno) return 0;
    unsigned long long mul = 1;
    if (*end == 'k' || *end == 'K') { mul = 1024ull; end++; }
    else if (*end == 'm' || *end == 'M') { mul = 1024ull * 1024ull; end++; }
    else if (*end == 'g' || *end == 'G') { mul = 1024ull * 1024ull * 1024ull; end++; }
    if (*end != '\0') return 0;
    if (v == 0 || v > (3ull << 30) / mul) return 0;
    return (size_t)(v * mul);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: fill SIZE data|zero|untouched|grow\n");
        return 2;
    }
    size_t size = parse_size(argv[1]);
    const char *mode = argv[2];
    int data = strcmp(mode, "data") == 0, zero = strcmp(mode, "zero") == 0, untouched = strcmp(mode, "untouched") == 0;
    int grow = strcmp(mode, "grow") == 0;
    if (size == 0 || !(data || zero || untouched || grow)) {
        fprintf(stderr, "fill: bad arguments '%s' '%s'\n", argv[1], mode);
        return 2;
    }
    size = (size + PAGE - 1) / PAGE * PAGE;
    if (grow) {
        printf("fill ready start=0x0 size=%zu mode=grow\n", size);
        fflush(stdout);
        const size_t chunk = 1024u * 1024u;
        for (size_t n = 0; (n + 1) * chunk <= size; n++) {
            uint8_t *c = malloc(chunk);
            if (c == NULL) break;
            memset(c, (int)(n % 255u) + 1, chunk);
            keep = c;
            usleep(10000);
        }
        for (;;) sleep(1);
    }
    uint8_t *region = malloc(size);
    if (region == NULL) {
        fprintf(stderr, "fill: cannot allocate %zu bytes\n", size);
        return 1;
    }
    if (data || zero) {
        /* 8 bytes per store: the guest runs instrumented, so fewer stores start faster. */
        for (size_t p = 0; p < size / PAGE; p++) {
            uint64_t v = 0x0101010101010101ull * (uint64_t)((p * 7u) % 255u + 1u);
            uint64_t *q = (uint64_t *)(region + p * PAGE);
            for (size_t i = 0; i < PAGE / 8; i++) q[i] = zero ? 0 : v;
            if (zero) q[0] = 0;
        }
    }
    keep = region;
    printf("fill ready start=0x%lx size=%zu mode=%s\n", (unsigned long)(uintptr_t)region, size, mode);
    fflush(stdout);
    for (;;) sleep(1);
}
