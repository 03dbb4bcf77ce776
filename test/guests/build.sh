#!/usr/bin/env bash
# Rebuilds the test guests: test/guests/memwalk.wasm, spin.wasm and fill.wasm.
# Run from anywhere (paths are relative to this script).
# Needs: clang (wasm32 target), wasi-libc, lld, libclang-rt-dev-wasm32, node.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../../tools/wasi-cc.sh
source "$here/../../tools/wasi-cc.sh"

CFLAGS=(--target=wasm32-wasi -O2 -Wall -Wextra -Werror -Wl,--strip-debug)
wasi_build "$here/memwalk.wasm" "${CFLAGS[@]}" "$here/memwalk/memwalk.c"
wasi_build "$here/spin.wasm" "${CFLAGS[@]}" "$here/spin/spin.c"
wasi_build "$here/fill.wasm" "${CFLAGS[@]}" "$here/fill/fill.c"
node "$here/check-wasm.mjs" "$here/memwalk.wasm" "$here/spin.wasm" "$here/fill.wasm"
