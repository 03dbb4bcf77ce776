#!/usr/bin/env bash
# Tests kv with the real Redis clients (redis-cli, redis-benchmark).
#
#   examples/kv/native-test.sh          build kv natively (cc) and test it
#   examples/kv/native-test.sh --wasm   test examples/kv/kv.wasm instead, run by
#                                       colo-vm itself (`colo run`; needs `npm run build`)
#
# Needs: a C compiler (cc / $CC) for the native build, redis-tools (apt-get
# install redis-tools). Uses a free local port (or $KV_TEST_PORT). Everything it
# creates lives in examples/kv/build/ (gitignored); the server is killed on exit.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build="$here/build"
mode=native
[ "${1:-}" = "--wasm" ] && mode=wasm

for tool in redis-cli redis-benchmark; do
  command -v "$tool" >/dev/null || { echo "error: $tool missing (sudo apt-get install -y redis-tools)" >&2; exit 1; }
done
mkdir -p "$build"
if [ "$mode" = native ]; then
  ${CC:-cc} -O2 -Wall -Wextra -o "$build/kv-native" "$here"/*.c -lm || exit 1
else
  command -v node >/dev/null || { echo "error: node missing" >&2; exit 1; }
  [ -f "$here/kv.wasm" ] || { echo "error: $here/kv.wasm missing; run examples/kv/build.sh" >&2; exit 1; }
fi

port="${KV_TEST_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 16379)}"
disk="$build/test-disk.img"
log="$build/test-server.log"
pid=""
fails=0
R() { redis-cli -p "$port" "$@"; }

stop() {
  if [ -n "$pid" ]; then
    kill "${1:--TERM}" "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    pid=""
  fi
}
cleanup() { stop; rm -f "$disk"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# start DISK_SIZE: starts the server on $disk (created with that size if absent)
start() {
  if [ "$mode" = native ]; then
    "$build/kv-native" -p "$port" -d "$disk" -s "$1" >>"$log" 2>&1 &
  else
    [ -f "$disk" ] || truncate -s "$1" "$disk"
    node "$here/../../dist/src/cli/main.js" run "$here/kv.wasm" --memory 256M --net "listen=127.0.0.1:$port" --drive "file=$disk" --serial stdio >>"$log" 2>&1 &
  fi
  pid=$!
  for _ in $(seq 200); do
    [ "$(R ping 2>/dev/null)" = PONG ] && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  echo "error: server did not start; log:" >&2
  cat "$log" >&2
  exit 1
}

check() { # check NAME EXPECTED ACTUAL
  if [ "$2" = "$3" ]; then
    echo "ok   $1"
  else
    echo "FAIL $1: expected [$2], got [$3]"
    fails=$((fails + 1))
  fi
}

# bench NAME ARGS...: every test of the run must report a rate, no errors
bench() {
  local name="$1"; shift
  local out
  out="$(redis-benchmark -p "$port" -q "$@" 2>&1 | tr '\r' '\n')"
  local rates errors
  rates="$(grep -c 'requests per second' <<<"$out")"
  errors="$(grep -ci 'error' <<<"$out")"
  grep 'requests per second' <<<"$out" | sed 's/^/       /'
  check "$name: 20 tests, no errors" "20 0" "$rates $errors"
}

rm -f "$disk" "$log"
echo "== kv $mode on port $port"
start 16M
check "ready line" "kv ready keys=0" "$(grep -m1 'kv ready' "$log")"
check "ping" "PONG" "$(R ping)"
check "set" "OK" "$(R set k v)"
check "get" "v" "$(R get k)"
check "get missing" "" "$(R get nokey)"
check "incr" "1 2 12" "$(R incr n) $(R incr n) $(R incrby n 10)"
check "wrongtype" "WRONGTYPE Operation against a key holding the wrong kind of value" "$(R lpush k x)"
check "unknown command" "ERR unknown command 'nosuchcmd'" "$(R nosuchcmd a)"
check "arity" "ERR wrong number of arguments for 'get' command" "$(R get)"
check "mset/mget" "OK a b" "$(R mset m1 a m2 b) $(R mget m1 m2 | tr '\n' ' ' | sed 's/ $//')"
check "list" "3 c b a" "$(R lpush l a b c) $(R lrange l 0 -1 | tr '\n' ' ' | sed 's/ $//')"
check "zset" "2 a 1" "$(R zadd z 2 b 1 a) $(R zpopmin z | tr '\n' ' ' | sed 's/ $//')"
check "config get" "save  appendonly yes" "$(R config get save | tr '\n' ' ')$(R config get appendonly | tr '\n' ' ' | sed 's/ $//')"

bench "redis-benchmark -n 20000" -n 20000
bench "redis-benchmark -n 20000 -P 16" -n 20000 -P 16

keys="$(R dbsize)"
stop
start 16M
check "restart keeps keys" "$keys v 12" "$(R dbsize) $(R get k) $(R get n)"

echo "== acknowledged writes survive kill -9"
rm -f "$disk"
stop
start 256K
R -r 1000000 incr ctr >"$build/acks.txt" 2>/dev/null &
cli=$!
sleep 1
stop -KILL
wait "$cli" 2>/dev/null
last="$(grep -E '^[0-9]+$' "$build/acks.txt" | tail -1)"
start 256K
after="$(R get ctr)"
if [ -n "$last" ] && [ "$after" -ge "$last" ] && [ "$after" -le $((last + 1)) ]; then
  echo "ok   counter after kill -9: $after (last acknowledged $last)"
else
  echo "FAIL counter after kill -9: $after (last acknowledged ${last:-none})"
  fails=$((fails + 1))
fi
rm -f "$build/acks.txt"

echo "== 64 KiB disk: compaction and disk full"
stop
rm -f "$disk"
mark=$(wc -l <"$log")
start 64K
for i in $(seq 1 2000); do echo "SET same value-$i"; done | R >/dev/null
check "overwrites compact" "value-2000" "$(R get same)"
check "compaction logged" "yes" "$(tail -n +$((mark + 1)) "$log" | grep -q 'compacted log' && echo yes || echo no)"
fill="$(for i in $(seq 1 3000); do echo "SET key:$i xxxxxxxxxxxxxxxxxxxx"; done | R | grep -v '^$')"
n_ok="$(grep -c '^OK$' <<<"$fill")"
n_full="$(grep -c '^ERR disk full$' <<<"$fill")"
echo "       3000 SETs: $n_ok OK, $n_full 'ERR disk full'"
check "fills up, then refuses" "yes" "$([ "$n_ok" -gt 0 ] && [ "$n_full" -gt 0 ] && [ $((n_ok + n_full)) -eq 3000 ] && echo yes || echo no)"
check "refused write not applied" "ERR disk full " "$(R set one-more v) $(R get one-more)"
check "DEL works on a full disk" "1" "$(R del key:1)"
check "write fits after DEL" "OK" "$(R set one-more v)"
keys="$(R dbsize)"
stop
start 64K
check "full disk survives restart" "$keys v" "$(R dbsize) $(R get one-more)"
check "FLUSHALL on a full disk" "OK 0" "$(R flushall) $(R dbsize)"
stop
start 64K
check "FLUSHALL persisted" "0" "$(R dbsize)"
stop

if [ "$fails" -eq 0 ]; then
  echo "PASS (kv $mode)"
else
  echo "$fails check(s) FAILED (kv $mode); server log: $log"
  exit 1
fi
