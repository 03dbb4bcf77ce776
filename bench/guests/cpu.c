/*
 * cpu.wasm — a CPU-bound benchmark guest: a fixed amount of integer work (a sieve, a sort,
 * a small matrix product, a byte-code interpreter loop and a hash), then it prints a checksum
 * and exits. Used by `npm run bench` to compare the instrumented guest (asyncify, preemption
 * checks) against the original module run without colo.
 *
 * usage: cpu [ROUNDS]   (default 3)
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint32_t lcg_state = 12345;
static uint32_t lcg(void) { lcg_state = lcg_state * 1664525u + 1013904223u; return lcg_state; }

static uint64_t sieve(int n) {
  char *composite = calloc(n + 1, 1);
  uint64_t sum = 0;
  for (int i = 2; i <= n; i++) {
    if (composite[i]) continue;
    sum += (uint64_t)i;
    for (long j = (long)i * i; j <= n; j += i) composite[j] = 1;
  }
  free(composite);
  return sum;
}

static int cmp(const void *a, const void *b) {
  uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
  return x < y ? -1 : x > y;
}

static uint64_t sort(int n) {
  uint32_t *v = malloc(sizeof(uint32_t) * n);
  for (int i = 0; i < n; i++) v[i] = lcg();
  qsort(v, n, sizeof(uint32_t), cmp);
  uint64_t h = 0;
  for (int i = 0; i < n; i += 97) h = h * 31 + v[i];
  free(v);
  return h;
}

static uint64_t matmul(int n) {
  int32_t *a = malloc(sizeof(int32_t) * n * n), *b = malloc(sizeof(int32_t) * n * n), *c = calloc(n * n, sizeof(int32_t));
  for (int i = 0; i < n * n; i++) { a[i] = (int32_t)(lcg() & 255); b[i] = (int32_t)(lcg() & 255); }
  for (int i = 0; i < n; i++)
    for (int k = 0; k < n; k++) {
      int32_t x = a[i * n + k];
      for (int j = 0; j < n; j++) c[i * n + j] += x * b[k * n + j];
    }
  uint64_t h = 0;
  for (int i = 0; i < n * n; i++) h = h * 1099511628211ull + (uint32_t)c[i];
  free(a); free(b); free(c);
  return h;
}

enum { OP_ADD, OP_SUB, OP_MUL, OP_JNZ, OP_DEC, OP_HALT };
static uint64_t interp(int loops) {
  /* r0 = counter, r1 = acc: acc = acc*3 + counter - 1, counter-- until 0 */
  const uint8_t prog[] = { OP_MUL, OP_ADD, OP_SUB, OP_DEC, OP_JNZ, OP_HALT };
  uint64_t r0 = (uint64_t)loops, r1 = 1;
  int pc = 0;
  for (;;) {
    switch (prog[pc]) {
      case OP_ADD: r1 += r0; pc++; break;
      case OP_SUB: r1 -= 1; pc++; break;
      case OP_MUL: r1 *= 3; pc++; break;
      case OP_DEC: r0--; pc++; break;
      case OP_JNZ: pc = r0 ? 0 : pc + 1; break;
      default: return r1;
    }
  }
}

static uint64_t hash(int n) {
  uint64_t h = 1469598103934665603ull;
  for (int i = 0; i < n; i++) { h ^= (uint64_t)(i & 0xff); h *= 1099511628211ull; }
  return h;
}

int main(int argc, char **argv) {
  int rounds = argc > 1 ? atoi(argv[1]) : 3;
  uint64_t sum = 0;
  for (int r = 0; r < rounds; r++) {
    sum += sieve(2000000);
    sum += sort(300000);
    sum += matmul(160);
    sum += interp(3000000);
    sum += hash(20000000);
  }
  printf("cpu checksum=%llu\n", (unsigned long long)sum);
  fflush(stdout);
  return 0;
}
