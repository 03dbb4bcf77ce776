#!/bin/bash
# Failover and re-protection, over and over, with every migration and checkpoint checked page
# by page (COLO_VERIFY_RAM=1). Runs `colo up` on kv.wasm under redis-benchmark SET/INCR load,
# then, each cycle: SIGKILL the primary, wait for the pair to be protected again, SIGKILL the
# secondary, wait again. Stops at the first RAM difference, crashed guest or guest exit.
# A short form of it (4 kills, plain and multifd, with a --drive) runs in npm test:
# test/colo/up-stress.test.ts.
#
#   npm run build && tools/stress-reprotect.sh
#   CYCLES=150 UP_ARGS="--parallel-connections 2" tools/stress-reprotect.sh
#
# Environment: CYCLES (default 40), PORT (default 7761), UP_ARGS (extra `colo up` options,
# e.g. --parallel-connections 2), LOADS (parallel redis-benchmark loops, default 3), CLIENTS
# (connections of each, default 4), LOG (default: a file in a new temporary folder),
# COLO_LOG (debug also logs each passing check). Needs redis-benchmark (Debian redis-tools).
# Exit status 1 when something was found (the log says what), 0 otherwise.
set -u
cd "$(dirname "$0")/.."
PORT=${PORT:-7761}
CYCLES=${CYCLES:-40}
WORK=$(mktemp -d /tmp/colo-stress.XXXXXX)
LOG=${LOG:-$WORK/up.log}
COLO_VERIFY_RAM=1 node dist/src/cli/main.js up examples/kv/kv.wasm --memory 256M --net "listen=127.0.0.1:$PORT" \
  --checkpoint-delay 300 ${UP_ARGS:-} --state-dir "$WORK/state" > "$LOG" 2>&1 &
UP=$!
# LOADS loops of redis-benchmark: the more CPU contention, the likelier a channel lags.
(
  exec 2> /dev/null # no "Terminated" lines when the loops are stopped
  for _ in $(seq 1 "${LOADS:-3}"); do
    (while kill -0 $UP 2>/dev/null; do redis-benchmark -h 127.0.0.1 -p "$PORT" -n 2000000 -c "${CLIENTS:-4}" -r 100000 -t set,incr -q > /dev/null 2>&1; sleep 0.05; done) &
  done
  wait
) &
LOAD=$!
cleanup() {
  kill $UP 2>/dev/null # the load loops end with it
  wait $UP 2>/dev/null
  pkill -f "redis-benchmark -h 127.0.0.1 -p $PORT " 2>/dev/null
  wait $LOAD 2>/dev/null
  echo "log: $LOG (the folder $WORK is kept for reading)"
}
trap cleanup EXIT
protections() { grep -c '^pair: protected' "$LOG"; }
found() { grep -E "differs from the source|guest crashed|guest exited with code|pair: failed" "$LOG"; }
wait_protected_after() { # $1: count to exceed; 30 s at most
  for _ in $(seq 1 300); do [ "$(protections)" -gt "$1" ] && return 0; sleep 0.1; done
  echo "not protected again within 30 s"; return 1
}
wait_protected_after 0 || exit 1
kills=0
for c in $(seq 1 "$CYCLES"); do
  for who in primary secondary; do
    n=$(protections)
    line=$(grep '^pair: protected' "$LOG" | tail -1)
    p=$(sed -E 's/.*primary pid ([0-9]+), secondary pid ([0-9]+).*/\1/' <<< "$line")
    s=$(sed -E 's/.*secondary pid ([0-9]+).*/\1/' <<< "$line")
    # colo up counts a protection that ends within 30 s of its start as a failed attempt and,
    # after five in a row, waits 60 s between attempts: every fourth one is kept for 31 s.
    kills=$((kills + 1))
    if [ $((kills % 4)) = 0 ]; then sleep 31; else sleep "0.$((RANDOM % 100))"; fi
    if [ $who = primary ]; then kill -9 "$p"; else kill -9 "$s"; fi
    wait_protected_after "$n" || exit 1
  done
  if found > /dev/null; then echo "cycle $c:"; found; exit 1; fi
  echo "cycle $c: no difference ($(grep -c 'up: protecting' "$LOG") protections so far)"
done
