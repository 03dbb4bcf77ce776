/*
 * spin - a guest that never calls the host after start-up.
 *
 * Prints "spin ready\n" to stdout, then runs a xorshift64 generator forever,
 * storing every value to a volatile global. It never returns and never makes
 * another host call, so it can only be stopped from outside (pause/kill).
 */
#include <stdint.h>
#include <stdio.h>

volatile uint64_t spin_sink;

int main(void) {
    fputs("spin ready\n", stdout);
    fflush(stdout);
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (;;) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        spin_sink = x;
    }
}
