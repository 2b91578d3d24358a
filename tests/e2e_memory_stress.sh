#!/usr/bin/env bash
# End-to-end memory checks against a running pensieve, with curl and jq (the seed's eight
# scenarios). Usage: tests/e2e_memory_stress.sh [BASE_URL]
# Without BASE_URL it starts target/release/pensieve on a free port and stops it at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in curl jq; do
  command -v "$tool" >/dev/null || { echo "e2e: $tool is required (apt-get install $tool)"; exit 1; }
done

BASE=${1:-}
SERVER_PID=
LOG=$(mktemp)
CACHE_DIR=$(mktemp -d)
cleanup() { [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$LOG" "$CACHE_DIR"; }
trap cleanup EXIT
if [ -z "$BASE" ]; then
  # The prompt cache's disk tier in a folder of its own: no file from another run is read.
  PENSIEVE_BACKEND__PROMPT_CACHE_DIR=$CACHE_DIR target/release/pensieve serve --port 0 2>"$LOG" &
  SERVER_PID=$!
  for _ in $(seq 1 600); do
    PORT=$(sed -n 's/.*pensieve is serving.*127\.0\.0\.1:\([0-9]*\).*/\1/p' "$LOG" | head -n1)
    [ -n "$PORT" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$LOG"; echo "e2e: server exited"; exit 1; }
    sleep 0.1
  done
  [ -n "${PORT:-}" ] || { cat "$LOG"; echo "e2e: server did not start"; exit 1; }
  BASE="http://127.0.0.1:$PORT"
fi

passed=0 failed=0
check() { # name, condition (shell expression), detail
  if eval "$2"; then passed=$((passed + 1)); echo "ok   $1"; else failed=$((failed + 1)); echo "FAIL $1: $3"; fi
}
msg() { curl -s -D "$2" "$BASE/v1/messages" -H 'content-type: application/json' \
  -d "{\"model\":\"demo\",\"max_tokens\":$1,\"temperature\":0,\"messages\":[{\"role\":\"user\",\"content\":\"hello\"}]}"; }

# 1. health
H=$(curl -s "$BASE/health")
check "health is up" '[ "$(jq -r .status <<<"$H")" = healthy ] || [ "$(jq -r .status <<<"$H")" = degraded ]' "$H"

# 2. memory info in /health
check "health carries memory info" 'jq -e ".memory | has(\"available_gb\") and has(\"total_gb\") and has(\"status\") and has(\"source\")" <<<"$H" >/dev/null' "$H"

# 3. reported memory against /proc/meminfo or the cgroup
SRC=$(jq -r .memory.source <<<"$H")
TOTAL=$(jq -r .memory.total_bytes <<<"$H")
AVAIL=$(jq -r .memory.available_bytes <<<"$H")
if [ "$SRC" = cgroup ]; then
  CG=$(awk -F: '$2 ~ /(^|,)memory(,|$)/ {print $3}' /proc/self/cgroup)
  EXPECT=$(cat "/sys/fs/cgroup/memory$CG/memory.limit_in_bytes" 2>/dev/null || cat "/sys/fs/cgroup$CG/memory.max")
else
  EXPECT=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) * 1024 ))
fi
MEMAVAIL=$(( $(awk '/^MemAvailable:/ {print $2}' /proc/meminfo) * 1024 ))
check "total matches ${SRC}" '[ "$TOTAL" = "$EXPECT" ]' "health $TOTAL vs $EXPECT"
DIFF=$(( AVAIL > MEMAVAIL ? AVAIL - MEMAVAIL : MEMAVAIL - AVAIL ))
check "available within 10% of MemAvailable" '[ "$SRC" = cgroup ] || [ $((DIFF * 10)) -le "$MEMAVAIL" ]' "health $AVAIL vs meminfo $MEMAVAIL"

# 4. a basic request
HDR=$(mktemp)
R=$(msg 16 "$HDR")
check "basic request answers a message" '[ "$(jq -r .type <<<"$R")" = message ] && [ "$(jq -r .usage.output_tokens <<<"$R")" = 16 ]' "$R"

# 5. ten requests, memory stable
B0=$(curl -s "$BASE/health" | jq .backend.active_bytes)
for _ in $(seq 1 10); do msg 32 /dev/null >/dev/null; done
B1=$(curl -s "$BASE/health" | jq .backend.active_bytes)
check "ten requests leave backend memory stable" '[ $((B1 - B0)) -le $((8 * 1024 * 1024)) ]' "active bytes $B0 -> $B1"

# 6. latency: a short answer comes back (a hang check with a wide margin, not a performance goal:
#    those live in benches/)
T=$(curl -s -o /dev/null -w '%{time_total}' "$BASE/v1/messages" -H 'content-type: application/json' \
  -d '{"model":"demo","max_tokens":8,"messages":[{"role":"user","content":"hi"}]}')
check "8-token answer in under 10 s (took ${T}s)" 'awk -v t="$T" "BEGIN {exit !(t < 10)}"' "took ${T}s"

# 7. memory headers
check "memory headers present" 'grep -qi "^x-memory-status: " "$HDR" && grep -qiE "^x-available-memory-gb: [0-9]+\.[0-9]{2}" "$HDR"' "$(cat "$HDR")"
rm -f "$HDR"

# 8. cache cleared between requests
msg 64 /dev/null >/dev/null
C=$(curl -s "$BASE/health" | jq .backend.cache_bytes)
check "MLX cache is 0 bytes between requests" '[ "$C" = 0 ]' "cache_bytes $C"

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
