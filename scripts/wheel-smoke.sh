#!/usr/bin/env bash
# The installed-wheel smoke test (the release workflow runs it on every wheel it builds; so
# does tests/wheel here): installs WHEEL into a fresh venv made by PYTHON, then from an
# unrelated folder with a fresh HOME runs `pensieve --version` and `pensieve config`, serves
# the demo model and answers one Messages request.
#   scripts/wheel-smoke.sh dist/pensieve-*.whl [PYTHON]
set -euo pipefail
wheel="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
python="${2:-python3}"
work="$(mktemp -d)"
port="${SMOKE_PORT:-7797}"
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
pid=
"$python" -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check "$wheel"
mkdir -p "$work/home" "$work/elsewhere"
cd "$work/elsewhere"
export HOME="$work/home"
unset VIRTUAL_ENV PENSIEVE_CONFIG PENSIEVE_CACHE_DIR PENSIEVE_PYTHON XDG_CACHE_HOME XDG_CONFIG_HOME
"$work/venv/bin/pensieve" --version
"$work/venv/bin/pensieve" config | grep '^resolved\.'
"$work/venv/bin/pensieve" serve --model demo --port "$port" > "$work/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$port/health/ready" > /dev/null && break
  kill -0 "$pid" 2> /dev/null || { cat "$work/serve.log"; echo "smoke: the server exited"; exit 1; }
  sleep 1
done
answer="$(curl -sf "http://127.0.0.1:$port/v1/messages" -H 'content-type: application/json' \
  -d '{"model":"demo","max_tokens":8,"messages":[{"role":"user","content":"Hello"}]}')" \
  || { cat "$work/serve.log"; echo "smoke: no answer"; exit 1; }
echo "$answer" | grep -q '"type":"message"' || { echo "smoke: not a message: $answer"; exit 1; }
grep -m1 'BLAS:' "$work/serve.log" || true
echo "smoke: ok: $answer"
