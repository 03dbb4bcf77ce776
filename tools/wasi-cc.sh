# Sourced by the guests' build scripts (examples/kv/build.sh, test/guests/build.sh): sets CC
# to a compiler that can build a WASI program (WASI_CC, or clang), or exits with the Debian
# packages to install.
# Needs: clang (wasm32 target), wasi-libc, lld, libclang-rt-dev-wasm32.
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
rm -rf "$probe"
trap - EXIT
