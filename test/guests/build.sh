#!/usr/bin/env bash
# Rebuilds the test guests: test/guests/memwalk.wasm, spin.wasm and fill.wasm.
# Run from anywhere (paths are relative to this script).
# Needs: clang (wasm32 target), wasi-libc, lld, libclang-rt-dev-wasm32, node.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../../tools/wasi-cc.sh
source "$here/../../tools/wasi-cc.sh"

CFLAGS=(--target=wasm32-wasi -O2 -Wall -Wextra -Werror -Wl,--strip-debug)
"$CC" "${CFLAGS[@]}" -o "$here/memwalk.wasm" "$here/memwalk/memwalk.c"
"$CC" "${CFLAGS[@]}" -o "$here/spin.wasm" "$here/spin/spin.c"
"$CC" "${CFLAGS[@]}" -o "$here/fill.wasm" "$here/fill/fill.c"
node "$here/check-wasm.mjs" "$here/memwalk.wasm" "$here/spin.wasm" "$here/fill.wasm"
