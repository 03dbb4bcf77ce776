/*
 * memwalk - guest for the live-migration tests.
 *
 * Usage: memwalk [SIZE]      SIZE in bytes, optional suffix K or M (powers of
 *                            1024); default 16M. Rounded up to a 4 KiB multiple.
 *
 * Allocates a 4096-aligned region, zeroes it, prints exactly one line
 *
 *     memwalk start=0x<hex address> size=<decimal bytes>\n
 *
 * and then loops forever: one pass increments (uint8, wrapping) the first byte
 * of every 4 KiB page of the region in ascending order, and after every full
 * pass a single 'B' (no newline) is written to stdout. The loop makes no other
 * host call. Consequently, in a snapshot of linear memory taken at any pause,
 * the first bytes of the region's pages read N+1 ... N+1, N ... N (mod 256):
 * at most one step down, or all equal.
 */
#include <ctype.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PAGE 4096u
#define DEFAULT_SIZE (16u * 1024u * 1024u)

/* Parses "123", "64K", "16M" (case-insensitive suffix). Returns 0 on error. */
static size_t parse_size(const char *s) {
    if (!isdigit((unsigned char)*s)) return 0;
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno) return 0;
    unsigned long long mul = 1;
    if (*end == 'k' || *end == 'K') { mul = 1024ull; end++; }
    else if (*end == 'm' || *end == 'M') { mul = 1024ull * 1024ull; end++; }
    if (*end != '\0') return 0;
    if (v == 0 || v > (3ull << 30) / mul) return 0; /* keep below 3 GiB */
    return (size_t)(v * mul);
}

int main(int argc, char **argv) {
    size_t size = DEFAULT_SIZE;
    if (argc > 1) {
        size = parse_size(argv[1]);
        if (size == 0) {
            fprintf(stderr, "memwalk: bad size '%s' (expected bytes, optional K/M suffix)\n", argv[1]);
            return 2;
        }
    }
    size = (size + PAGE - 1) / PAGE * PAGE;

    uint8_t *region = aligned_alloc(PAGE, size);
    if (region == NULL) {
        fprintf(stderr, "memwalk: cannot allocate %zu bytes\n", size);
        return 1;
    }
    memset(region, 0, size);

    printf("memwalk start=0x%lx size=%zu\n", (unsigned long)(uintptr_t)region, size);
    fflush(stdout);

    volatile uint8_t *p = region;
    const size_t pages = size / PAGE;
    static const char pass_marker = 'B';
    for (;;) {
        for (size_t i = 0; i < pages; i++) {
            p[i * PAGE] = (uint8_t)(p[i * PAGE] + 1u);
        }
        /* One fd_write per pass, straight to fd 1: nothing else touches the host. */
        if (write(1, &pass_marker, 1) < 0) return 1;
    }
}
