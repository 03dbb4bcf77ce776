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

# wasi_build OUT.wasm CLANG-ARGS... : builds OUT.wasm from the .c files among CLANG-ARGS.
# Compiled with every flag, linked without the -O ones: after an optimized link clang runs
# `wasm-opt` when one is on PATH (binaryen's, which `npm run` puts there from node_modules,
# or Debian's binaryen package), and its output uses post-MVP instructions (sign extension)
# that check-wasm.mjs refuses, so `npm run guests` failed. The link itself takes no -O: the
# result is the same module a plain `clang -O2 ... -o OUT.wasm` gives without a wasm-opt.
wasi_build() {
  local out="$1"
  shift
  local compile=() link=() srcs=() objs=() a dir i=0
  for a in "$@"; do
    case "$a" in
      *.c) srcs+=("$a") ;;
      -O*) compile+=("$a") ;;
      -Wl,*) link+=("$a") ;;
      *) compile+=("$a") && link+=("$a") ;;
    esac
  done
  dir="$(mktemp -d)"
  for a in "${srcs[@]}"; do
    i=$((i + 1))
    "$CC" "${compile[@]}" -c -o "$dir/$i.o" "$a" || { rm -rf "$dir"; return 1; }
    objs+=("$dir/$i.o")
  done
  "$CC" "${link[@]}" -o "$out" "${objs[@]}" || { rm -rf "$dir"; return 1; }
  rm -rf "$dir"
}
