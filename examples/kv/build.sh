#!/usr/bin/env bash
# Rebuilds examples/kv/kv.wasm (the Redis-protocol key-value guest).
# Run from anywhere (paths are relative to this script).
# Needs: clang (wasm32 target), wasi-libc, lld, libclang-rt-dev-wasm32, node.
# For a native (POSIX) build to test with redis-cli, see native-test.sh.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../../tools/wasi-cc.sh
source "$here/../../tools/wasi-cc.sh"

# --strip-debug keeps the function-name section (3-4 KB) so traps are readable.
# A 1 MiB stack instead of wasm-ld's 64 KiB default leaves room for the
# recursive sorted-set code.
wasi_build "$here/kv.wasm" --target=wasm32-wasi -O2 -Wall -Wextra -Werror \
  -Wl,--strip-debug -Wl,-z,stack-size=1048576 \
  "$here"/*.c
node "$here/../../test/guests/check-wasm.mjs" "$here/kv.wasm"
