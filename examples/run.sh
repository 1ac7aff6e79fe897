#!/usr/bin/env bash
# Runs the Python and Node.js examples against a live worker and the simulator, and checks the
# events they print: every job they published comes back once, with the outcome it should have.
#
#   bash examples/run.sh            (DIALER_AMQP_URL: the broker; default guest on 127.0.0.1)
#
# It installs what the examples need, idempotently: pika into a venv under target/ (PyPI) and
# amqplib into examples/node/node_modules (npm). It starts `dialer sim` and `dialer run` from
# the built binary under a throwaway prefix, and removes that prefix's queues at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
here=examples
export DIALER_AMQP_URL="${DIALER_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export DIALER_PREFIX="examples-$(date +%s)-$$"
if [ -z "${DIALER_BIN:-}" ]; then
  cargo build -q --locked # a no-op when the tests just built it; never a stale binary
fi
dialer="${DIALER_BIN:-target/debug/dialer}"
work="$(mktemp -d)"
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ -n "${python:-}" ] && [ -x "$python" ]; then
    "$python" - <<'PY' || true
import os, pika
prefix = os.environ["DIALER_PREFIX"]
connection = pika.BlockingConnection(pika.URLParameters(os.environ["DIALER_AMQP_URL"]))
queues = [f"{prefix}.jobs", f"{prefix}.jobs.dead", f"{prefix}.example-python", f"{prefix}.example-node"]
queues += [f"{prefix}.jobs.delay.{tier}" for tier in ("1s", "5s", "30s", "2m", "10m")]
for queue in queues:
    connection.channel().queue_delete(queue=queue)
for exchange in (f"{prefix}.jobs", f"{prefix}.replies", f"{prefix}.internal"):
    try:  # a missing exchange closes the channel it was asked on; each gets its own
        connection.channel().exchange_delete(exchange=exchange)
    except pika.exceptions.ChannelClosedByBroker:
        pass
connection.close()
PY
  fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "-- installing pika (PyPI, into target/examples-venv) and amqplib (npm)"
venv=target/examples-venv
retry() { "$@" || { echo "retrying: $*" >&2; sleep 5; "$@"; }; }
if [ -x "$venv/bin/python" ] || python3 -m venv "$venv" 2>/dev/null; then
  "$venv/bin/python" -c 'import pika' 2>/dev/null || retry "$venv/bin/pip" install -q 'pika>=1.3,<2'
  python="$venv/bin/python"
else
  # No venv module (Debian without python3-venv): Debian's own pika for Debian's python.
  rm -rf "$venv"
  /usr/bin/python3 -c 'import pika' 2>/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pika
  }
  python=/usr/bin/python3
fi
[ -d "$here/node/node_modules/amqplib" ] ||
  (cd "$here/node" && retry npm install --no-audit --no-fund --silent)

echo "-- starting the simulator and a worker (prefix $DIALER_PREFIX)"
"$dialer" sim --addr 127.0.0.1:0 >"$work/sim.out" 2>"$work/sim.err" &
pids+=($!)
for _ in $(seq 1 100); do grep -q '^listening on ' "$work/sim.out" && break; sleep 0.1; done
sim_url="$(sed -n 's/^listening on //p' "$work/sim.out" | head -n 1)"
[ -n "$sim_url" ] || { cat "$work/sim.err"; echo "the simulator did not start" >&2; exit 1; }
# The topology first, so jobs published before the worker is up wait in the queue.
"$dialer" topology >/dev/null
GENESYS_CLIENT_ID=demo GENESYS_CLIENT_SECRET=demo-secret \
GENESYS_API_BASE_URL="$sim_url" GENESYS_LOGIN_BASE_URL="$sim_url" \
DIALER_METRICS_ADDR=127.0.0.1:0 DIALER_STATE_DIR="$work/state" \
  "$dialer" run >"$work/worker.log" 2>&1 &
pids+=($!)

echo "-- consumers first (their queues must be bound before events are published)"
"$python" "$here/python/consumer.py" "$DIALER_PREFIX.example-python" 3 >"$work/python.events" 2>"$work/python.err" &
py_consumer=$!
node "$here/node/consumer.js" "$DIALER_PREFIX.example-node" 3 >"$work/node.events" 2>"$work/node.err" &
node_consumer=$!
for log in "$work/python.err" "$work/node.err"; do
  for _ in $(seq 1 100); do grep -q '^listening on ' "$log" && break; sleep 0.1; done
  grep -q '^listening on ' "$log" || { cat "$log"; echo "a consumer did not start" >&2; exit 1; }
done

echo "-- producers"
"$python" "$here/python/producer.py" py-1001 agent1@example.com +14155552671
node "$here/node/producer.js" node-1002 agent2@example.com +14155552672
"$python" "$here/python/producer.py" py-bad-1003 agent1@example.com 12345

wait "$py_consumer" || { cat "$work/python.err" "$work/worker.log"; exit 1; }
wait "$node_consumer" || { cat "$work/node.err" "$work/worker.log"; exit 1; }

echo "-- checking the events each consumer printed"
for events in "$work/python.events" "$work/node.events"; do
  "$python" - "$events" <<'PY'
import json, sys
events = [json.loads(line) for line in open(sys.argv[1])]
got = {e["jobId"]: e["outcome"] for e in events}
want = {"py-1001": "placed", "node-1002": "placed", "py-bad-1003": "rejected"}
assert len(events) == 3 and got == want, f"{sys.argv[1]}: {got}"
placed = [e for e in events if e["outcome"] == "placed"]
assert all(e.get("conversationId") and e["attributes"]["crmRecord"] == e["jobId"] for e in placed), events
print(f"ok {sys.argv[1].rsplit('/', 1)[-1]}: " + ", ".join(f"{k} {v}" for k, v in sorted(got.items())))
PY
done
echo "examples: ok"
