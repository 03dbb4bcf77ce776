#!/usr/bin/env bash
# Rebuilds bench/guests/cpu.wasm (needs Debian's clang, lld, wasi-libc, libclang-rt-dev-wasm32).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
command -v clang >/dev/null || { echo "error: clang missing (apt-get install -y clang lld wasi-libc libclang-rt-dev-wasm32)" >&2; exit 1; }
clang --target=wasm32-wasi -O2 -Wl,--strip-debug -o "$here/cpu.wasm" "$here/cpu.c"
