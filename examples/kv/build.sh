#!/usr/bin/env bash
# Rebuilds examples/kv/kv.wasm (the Redis-protocol key-value guest).
# Run from anywhere (paths are relative to this script).
# Needs: clang (wasm32 target), wasi-libc, lld, libclang-rt-dev-wasm32, node.
# For a native (POSIX) build to test with redis-cli, see native-test.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CC="${WASI_CC:-clang}"

need_pkgs="sudo apt-get install -y clang lld wasi-libc libclang-rt-dev-wasm32"
if ! command -v "$CC" >/dev/null 2>&1; then
  echo "error: '$CC' not found. Install the WASI toolchain with:" >&2
  echo "  $need_pkgs" >&2
  exit 1
fi
probe="$(mktemp -d)"
trap 'rm -rf "$probe"' EXIT
printf '#include <stdio.h>\nint main(void){puts("x");return 0;}\n' >"$probe/p.c"
if ! "$CC" --target=wasm32-wasi -O2 -o "$probe/p.wasm" "$probe/p.c" 2>"$probe/err"; then
  cat "$probe/err" >&2
  echo "error: '$CC --target=wasm32-wasi' cannot build a WASI program (wasi-libc, lld or the wasm32 compiler-rt missing?). Install with:" >&2
  echo "  $need_pkgs" >&2
  exit 1
fi

# --strip-debug keeps the function-name section (3-4 KB) so traps are readable.
# A 1 MiB stack instead of wasm-ld's 64 KiB default leaves room for the
# recursive sorted-set code.
"$CC" --target=wasm32-wasi -O2 -Wall -Wextra -Werror \
  -Wl,--strip-debug -Wl,-z,stack-size=1048576 \
  -o "$here/kv.wasm" "$here"/*.c
node "$here/../../test/guests/check-wasm.mjs" "$here/kv.wasm"
