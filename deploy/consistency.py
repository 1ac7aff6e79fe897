"""Cross-checks between the deploy/ assets that no single validator sees (run by check.sh).

Usage: python consistency.py KUSTOMIZE_FILE_STORE.yaml KUSTOMIZE_FLEET.yaml   (PyYAML; check.sh's venv has it)

- metric names used by the alerts and the dashboard exist in src/metrics.rs;
- every alert has `for`, a severity, summary/description/runbook_url, a section of
  docs/runbook.md that its runbook_url points at, groups by `prefix`, names no job or queue,
  and has unit tests where it fires and where it stays silent;
- compose: files it mounts exist, the worker gets more stop time than its shutdown grace,
  Prometheus scrapes services that exist, Grafana's image matches @grafana/schema's version;
- Kubernetes, fleet: several replicas, RollingUpdate, a PodDisruptionBudget selecting the pods,
  no volume claim, decisions in PostgreSQL and the rate in fleet scope with their URLs from the
  Secret, KEDA above one replica;
- Kubernetes, file store (both, where it applies): one replica with Recreate, grace above DIALER_SHUTDOWN_GRACE, probes on
  /readyz and /healthz (startup and liveness), the liveness timeout above the Genesys timeout, the secret as a file, Service/ServiceMonitor/Deployment wired to each
  other, the KEDA example counting unacked messages on the right queue.
Prints what it checked; exits 1 with one line per problem.
"""

import json
import re
import sys
from pathlib import Path

import yaml

from agreed_metrics import AGREED

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
problems = []
notes = []


def problem(message):
    problems.append(message)


def seconds(value):
    """'20s', '2m', '1m30s', '500ms' or a number of seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    total, rest = 0.0, str(value).strip()
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", rest):
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    if not re.fullmatch(r"((\d+(\.\d+)?)(ms|s|m|h))+", rest):
        problem(f"cannot read the duration {value!r}")
    return total


# ---------------------------------------------------------------- metric names
declared = set(re.findall(r'"(dialer_[a-z0-9_]+)"', (ROOT / "src/metrics.rs").read_text()))
if not declared:
    problem("no metric names found in src/metrics.rs")
dashboard_text = (ROOT / "dashboards/dialer.json").read_text()
alerts_text = (DEPLOY / "prometheus/alerts.yml").read_text()


def used_metrics(text):
    names = set()
    for name in re.findall(r"\bdialer_[a-z0-9_]+", text):
        names.add(re.sub(r"_(bucket|sum|count)$", "", name))
    return names


pending = sorted((used_metrics(alerts_text) | used_metrics(dashboard_text)) & AGREED - declared)
if pending:
    notes.append("agreed, not yet in src/metrics.rs: " + ", ".join(pending))
for where, text in (("prometheus/alerts.yml", alerts_text), ("dashboards/dialer.json", dashboard_text)):
    for name in sorted(used_metrics(text) - declared - AGREED):
        problem(f"{where} uses {name}, which src/metrics.rs does not declare")
missing_on_dashboard = sorted(declared - used_metrics(dashboard_text))
if missing_on_dashboard:
    notes.append("not on the dashboard: " + ", ".join(missing_on_dashboard))

# ---------------------------------------------------------------- alerts
rules = yaml.safe_load(alerts_text)
tests = yaml.safe_load((DEPLOY / "prometheus/alerts.test.yml").read_text())
readme = (DEPLOY / "README.md").read_text()
runbook = (ROOT / "docs/runbook.md").read_text()


def anchor(heading):
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


runbook_anchors = {anchor(h) for h in re.findall(r"^#+ (.+)$", runbook, re.M)}
alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
fires, silent = set(), set()
for test in tests["tests"]:
    for case in test.get("alert_rule_test", []):
        (fires if case.get("exp_alerts") else silent).add(case["alertname"])
for rule in alerts:
    name = rule["alert"]
    if "for" not in rule:
        problem(f"alert {name} has no `for`")
    if rule.get("labels", {}).get("severity") not in ("critical", "warning"):
        problem(f"alert {name} has no severity critical|warning")
    for key in ("summary", "description", "runbook_url"):
        if not rule.get("annotations", {}).get(key):
            problem(f"alert {name} has no {key} annotation")
    url = rule.get("annotations", {}).get("runbook_url", "")
    if not url.startswith("docs/runbook.md#") or url.split("#", 1)[1] not in runbook_anchors:
        problem(f"alert {name}: runbook_url {url!r} is not a section of docs/runbook.md")
    # Recording rules named dialer:* all keep `prefix` (checked by the tests' exp_labels).
    if "prefix" not in rule["expr"] and not re.search(r"\bdialer:[a-z_:0-9]+", rule["expr"]):
        problem(f"alert {name} does not group by prefix")
    if re.search(r'\bjob\s*=~?\s*"|queue\s*=\s*"', rule["expr"]):
        problem(f"alert {name} names a job or a queue literally")
    if name not in fires:
        problem(f"alert {name} has no test where it fires")
    if name not in silent:
        problem(f"alert {name} has no test where it stays silent")
    if f"`{name}`" not in readme:
        problem(f"alert {name} is not in deploy/README.md's table")
for record in (r for g in rules["groups"] for r in g["rules"] if "record" in r):
    if re.search(r'\bjob\s*=~?\s*"|queue\s*=\s*"', record["expr"]):
        problem(f"recording rule {record['record']} names a job or a queue literally")

# ---------------------------------------------------------------- compose
compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
services = compose["services"]
for name, service in services.items():
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        if source.startswith((".", "/")) and not (DEPLOY / source).exists():
            problem(f"compose: {name} mounts {source}, which does not exist")
    build = service.get("build")
    if build:
        context = DEPLOY / build["context"]
        if not (context / build["dockerfile"]).exists():
            problem(f"compose: {name} builds from a Dockerfile that does not exist")
for name, secret in compose.get("secrets", {}).items():
    if not (DEPLOY / secret["file"]).exists():
        problem(f"compose: secret {name} file {secret['file']} does not exist")
worker = services["worker"]
grace = seconds(worker["environment"].get("DIALER_SHUTDOWN_GRACE", "20s"))
if seconds(worker.get("stop_grace_period", "10s")) <= grace:
    problem("compose: the worker's stop_grace_period is not above DIALER_SHUTDOWN_GRACE")
prometheus_config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
for job in prometheus_config["scrape_configs"]:
    for static in job.get("static_configs", []):
        for target in static["targets"]:
            if target.split(":")[0] not in services:
                problem(f"prometheus.yml: job {job['job_name']} scrapes {target}, not a compose service")
grafana = services["grafana"]
dashboard_mounts = [v.split(":")[1] for v in grafana["volumes"] if v.startswith("../dashboards/dialer.json:")]
providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/dialer.yaml").read_text())["providers"]
if not dashboard_mounts or str(Path(dashboard_mounts[0]).parent) not in [p["options"]["path"] for p in providers]:
    problem("compose: dashboards/dialer.json is not mounted where the dashboard provider looks")
elif grafana["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH") != dashboard_mounts[0]:
    problem("compose: Grafana's home dashboard path is not the mounted dialer.json")
datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"]
for source in datasources:
    host = re.sub(r"^\w+://", "", source["url"]).split(":")[0].split("/")[0]
    if host not in services:
        problem(f"grafana data source {source['name']} points at {host}, not a compose service")
schema_version = json.loads((DEPLOY / "grafana/check/package.json").read_text())["devDependencies"]["@grafana/schema"]
grafana_tag = services["grafana"]["image"].split(":")[1]
if grafana_tag != schema_version:
    problem(f"compose runs grafana {grafana_tag} but the dashboard is checked against @grafana/schema {schema_version}")

# ---------------------------------------------------------------- kubernetes
docs = [d for d in yaml.safe_load_all(Path(sys.argv[1]).read_text()) if d]
by_kind = {}
for doc in docs:
    by_kind.setdefault(doc["kind"], []).append(doc)
deployment = by_kind["Deployment"][0]
spec = deployment["spec"]
pod = spec["template"]["spec"]
container = pod["containers"][0]
config = [d for d in by_kind["ConfigMap"] if d["metadata"]["name"].startswith("dialer-config")][0]["data"]
if spec.get("replicas") != 1:
    problem("kubernetes: the Deployment must have replicas: 1 (file decision store)")
if spec.get("strategy", {}).get("type") != "Recreate":
    problem("kubernetes: the Deployment must use the Recreate strategy (one worker per state volume)")
k8s_grace = seconds(config.get("DIALER_SHUTDOWN_GRACE", "20s"))
if pod.get("terminationGracePeriodSeconds", 30) <= k8s_grace:
    problem("kubernetes: terminationGracePeriodSeconds is not above DIALER_SHUTDOWN_GRACE")
if container.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
    problem("kubernetes: the readiness probe is not /readyz")
if container.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
    problem("kubernetes: the liveness probe is not /healthz")
if container.get("startupProbe", {}).get("httpGet", {}).get("path") != "/healthz":
    problem("kubernetes: the startup probe is not /healthz")
if seconds(config.get("DIALER_LIVENESS_TIMEOUT", "120s")) <= seconds(config.get("GENESYS_TIMEOUT", "10s")):
    problem("kubernetes: DIALER_LIVENESS_TIMEOUT must stay above GENESYS_TIMEOUT (a call in flight is no wedge)")
env = {e["name"]: e for e in container.get("env", [])}
if "GENESYS_CLIENT_SECRET" in env or "GENESYS_CLIENT_SECRET" in config:
    problem("kubernetes: the client secret must come as a file, not GENESYS_CLIENT_SECRET")
secret_file = env.get("GENESYS_CLIENT_SECRET_FILE", {}).get("value", "")
mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
volumes = {v["name"]: v for v in pod.get("volumes", [])}
secret_mount = [p for p in mounts if secret_file.startswith(p + "/")]
if not secret_mount or "secret" not in volumes.get(mounts[secret_mount[0]], {}):
    problem("kubernetes: GENESYS_CLIENT_SECRET_FILE is not on a mounted Secret")
state_dir = env.get("DIALER_STATE_DIR", {}).get("value") or config.get("DIALER_STATE_DIR")
if "persistentVolumeClaim" not in volumes.get(mounts.get(state_dir, ""), {}):
    problem("kubernetes: DIALER_STATE_DIR is not on the PersistentVolumeClaim")
pod_labels = spec["template"]["metadata"]["labels"]
container_ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
service = by_kind["Service"][0]
if not set(service["spec"]["selector"].items()) <= set(pod_labels.items()):
    problem("kubernetes: the Service selects no pod of the Deployment")
service_ports = {p["name"]: p for p in service["spec"]["ports"]}
for port in service_ports.values():
    if port["targetPort"] not in container_ports and port["targetPort"] not in container_ports.values():
        problem(f"kubernetes: Service port {port['name']} targets no container port")
for monitor in by_kind.get("ServiceMonitor", []):
    wanted = monitor["spec"]["selector"]["matchLabels"]
    if not set(wanted.items()) <= set(service["metadata"].get("labels", {}).items()):
        problem("kubernetes: the ServiceMonitor selects no Service")
    for endpoint in monitor["spec"]["endpoints"]:
        if endpoint["port"] not in service_ports:
            problem(f"kubernetes: the ServiceMonitor scrapes port {endpoint['port']}, not on the Service")
if service["metadata"]["name"] != "dialer":
    problem("kubernetes: the alerts expect job=\"dialer\", the Service's name")
keda = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes/keda-scaledobject.yaml").read_text()) if d]
for scaled in (d for d in keda if d["kind"] == "ScaledObject"):
    if scaled["spec"]["scaleTargetRef"]["name"] != deployment["metadata"]["name"]:
        problem("keda: the ScaledObject scales another Deployment")
    if scaled["spec"].get("maxReplicaCount", 100) > 1:
        problem("keda: maxReplicaCount above 1 needs a shared decision store")
    for trigger in scaled["spec"]["triggers"]:
        meta = trigger["metadata"]
        if meta.get("protocol") != "http" or meta.get("excludeUnacknowledged", "false") != "false":
            problem("keda: the rabbitmq trigger must count unacked messages (protocol http, excludeUnacknowledged false)")
        if meta.get("queueName") != config.get("DIALER_PREFIX", "dialer") + ".jobs":
            problem("keda: queueName is not the jobs queue of DIALER_PREFIX")

# ---------------------------------------------------------------- kubernetes, fleet overlay
fleet_docs = [d for d in yaml.safe_load_all(Path(sys.argv[2]).read_text()) if d]
fleet_kinds = {}
for doc in fleet_docs:
    fleet_kinds.setdefault(doc["kind"], []).append(doc)
fleet = fleet_kinds["Deployment"][0]
fleet_pod = fleet["spec"]["template"]["spec"]
fleet_container = fleet_pod["containers"][0]
fleet_config = [d for d in fleet_kinds["ConfigMap"] if d["metadata"]["name"].startswith("dialer-config")][0]["data"]
fleet_env = {e["name"]: e for e in fleet_container.get("env", [])}
for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
    if fleet_container.get(probe, {}).get("httpGet", {}).get("path") != path:
        problem(f"fleet: the {probe} is not {path}")
if fleet["spec"].get("replicas", 1) < 2:
    problem("fleet: the Deployment must have several replicas")
if fleet["spec"].get("strategy", {}).get("type") != "RollingUpdate":
    problem("fleet: the Deployment must use RollingUpdate")
if "PersistentVolumeClaim" in fleet_kinds or any("persistentVolumeClaim" in v for v in fleet_pod.get("volumes", [])):
    problem("fleet: no volume claim (the decisions live in PostgreSQL)")
if fleet_config.get("DIALER_DECISIONS") != "postgres":
    problem("fleet: DIALER_DECISIONS must be postgres")
if fleet_config.get("DIALER_RATE_SCOPE") != "fleet":
    problem("fleet: DIALER_RATE_SCOPE must be fleet")
for name in ("DIALER_DATABASE_URL", "DIALER_REDIS_URL"):
    if "secretKeyRef" not in fleet_env.get(name, {}).get("valueFrom", {}):
        problem(f"fleet: {name} must come from the Secret")
fleet_labels = fleet["spec"]["template"]["metadata"]["labels"]
budgets = fleet_kinds.get("PodDisruptionBudget", [])
if not budgets or not set(budgets[0]["spec"]["selector"]["matchLabels"].items()) <= set(fleet_labels.items()):
    problem("fleet: no PodDisruptionBudget selecting the pods")
if fleet_pod.get("terminationGracePeriodSeconds", 30) <= seconds(fleet_config.get("DIALER_SHUTDOWN_GRACE", "20s")):
    problem("fleet: terminationGracePeriodSeconds is not above DIALER_SHUTDOWN_GRACE")
fleet_keda = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes-fleet/keda-scaledobject.yaml").read_text()) if d]
for scaled in (d for d in fleet_keda if d["kind"] == "ScaledObject"):
    if scaled["spec"].get("maxReplicaCount", 100) < 2:
        problem("fleet keda: maxReplicaCount must be above 1")
    for trigger in scaled["spec"]["triggers"]:
        if trigger["metadata"].get("excludeUnacknowledged", "false") != "false":
            problem("fleet keda: the trigger must count unacked messages")
for kind in ("ServiceMonitor", "PrometheusRule"):
    for doc in by_kind.get(kind, []) + fleet_kinds.get(kind, []):
        if "release" not in doc["metadata"].get("labels", {}):
            problem(f"kubernetes: the {kind} has no `release` label (kube-prometheus-stack selects on it)")
dash_maps = [d for d in by_kind.get("ConfigMap", []) if d["metadata"].get("labels", {}).get("grafana_dashboard")]
if not dash_maps:
    problem("kubernetes: no dashboards ConfigMap labelled for the Grafana sidecar")

for p in problems:
    print(f"  {p}", file=sys.stderr)
summary = f"{len(declared)} metrics, {len(alerts)} alerts, {len(services)} compose services, {len(docs)} + {len(fleet_docs)} Kubernetes objects (file store + fleet)"
if notes:
    summary += " (note: " + "; ".join(notes) + ")"
print(summary)
sys.exit(1 if problems else 0)
