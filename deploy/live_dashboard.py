"""Every panel query of a dashboard must return data from a live Prometheus (run by check.sh).

Usage: python live_dashboard.py PROMETHEUS_URL DASHBOARD.json [--declared src/metrics.rs] [--skip-rabbitmq]
                                [--var NAME=VALUE ...] [--expect-alert NAME ...]

- Each target's expression, with the dashboard's variables filled in, is an instant query;
  an empty result fails (a misspelt metric or label gives exactly that).
- Queries on agreed metrics (agreed_metrics.py) that --declared (src/metrics.rs) does not
  declare yet are listed as pending, not failed; --skip-rabbitmq lists the rabbitmq_* queries as not
  checked (no rabbitmq_prometheus plugin to scrape).
- Every rule Prometheus loaded must evaluate without error, and each --expect-alert must be
  firing (the rules run against the same live data).
Prints one line per problem and a summary; exits 1 on any problem.
"""

import json
import re
import sys
import urllib.parse
import urllib.request

from agreed_metrics import AGREED


def query(base, expr):
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    if body.get("status") != "success":
        raise RuntimeError(body.get("error", "query failed"))
    return body["data"]["result"]


def main():
    args = sys.argv[1:]
    base, dashboard_path = args[0].rstrip("/"), args[1]
    pending, declared, skip_rabbitmq, expect_alerts = None, set(), False, []
    values = {"__rate_interval": "1m", "datasource": "prometheus", "instance": ".+"}
    i = 2
    while i < len(args):
        if args[i] == "--declared":
            declared = set(re.findall(r'"(dialer_[a-z0-9_]+)"', open(args[i + 1]).read()))
            pending = "undeclared"
            i += 2
        elif args[i] == "--skip-rabbitmq":
            skip_rabbitmq = True
            i += 1
        elif args[i] == "--var":
            name, value = args[i + 1].split("=", 1)
            values[name] = value
            i += 2
        elif args[i] == "--expect-alert":
            expect_alerts.append(args[i + 1])
            i += 2
        else:
            sys.exit(f"unknown argument {args[i]}")

    dashboard = json.load(open(dashboard_path))
    problems, checked, pending_queries, not_checked = [], 0, [], []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name in sorted(values, key=len, reverse=True):
                expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
            where = f"panel {panel['id']} {panel['title']!r} {target['refId']}"
            if "$" in expr:
                problems.append(f"{where}: unknown variable in {expr}")
                continue
            metrics = set(re.findall(r"\b(?:dialer|rabbitmq)_[a-z0-9_]+", expr))
            metrics = {re.sub(r"_(bucket|sum|count)$", "", m) for m in metrics}
            if pending == "undeclared" and (metrics & AGREED) - declared:
                pending_queries.append(where)
                continue
            if skip_rabbitmq and any(m.startswith("rabbitmq_") for m in metrics):
                not_checked.append(where)
                continue
            try:
                result = query(base, expr)
            except Exception as error:  # noqa: BLE001 - any failure is the panel's problem
                problems.append(f"{where}: {error}")
                continue
            checked += 1
            if not result:
                problems.append(f"{where}: no data for {expr}")

    with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10) as response:
        groups = json.load(response)["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    for rule in rules:
        if rule.get("health") != "ok":
            problems.append(f"rule {rule['name']}: {rule.get('health')} {rule.get('lastError', '')}")
    for name in expect_alerts:
        if not query(base, f'ALERTS{{alertname="{name}", alertstate="firing"}}'):
            problems.append(f"alert {name} is not firing on the live data")

    for line in problems:
        print(f"  {line}", file=sys.stderr)
    summary = f"{checked} panel queries with data, {len(rules)} rules evaluated"
    if expect_alerts:
        summary += ", firing: " + ", ".join(expect_alerts)
    if pending_queries:
        summary += f"; pending (agreed metrics not exported yet): {len(pending_queries)}"
    if not_checked:
        summary += f"; not checked (no rabbitmq_prometheus): {len(not_checked)}"
    print(summary)
    sys.exit(1 if problems else 0)


main()
