#!/usr/bin/env bash
# Rebuilds the test guests: test/guests/memwalk.wasm, spin.wasm and fill.wasm.
# Run from anywhere (paths are relative to this script).
# Needs: clang (wasm32 target), wasi-libc, libclang-rt-dev-wasm32, node.
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

CFLAGS=(--target=wasm32-wasi -O2 -Wall -Wextra -Werror -Wl,--strip-debug)
"$CC" "${CFLAGS[@]}" -o "$here/memwalk.wasm" "$here/memwalk/memwalk.c"
"$CC" "${CFLAGS[@]}" -o "$here/spin.wasm" "$here/spin/spin.c"
"$CC" "${CFLAGS[@]}" -o "$here/fill.wasm" "$here/fill/fill.c"
node "$here/check-wasm.mjs" "$here/memwalk.wasm" "$here/spin.wasm" "$here/fill.wasm"
