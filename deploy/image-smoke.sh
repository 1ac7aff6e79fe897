#!/usr/bin/env bash
# Builds the image from the top-level Dockerfile with podman and smoke-tests it (run by .ci/run).
#
#   bash deploy/image-smoke.sh            # after `cargo build --release` (or DIALER_BIN=...)
#
# What it proves: the image builds; it runs as a non-root user; its HEALTHCHECK passes; `dialer
# run` inside it becomes ready against the local RabbitMQ (a throw-away vhost) and the simulator
# (`dialer sim` on the host), and places a call; SIGTERM with a call in flight makes it finish
# that call and exit 0 within the grace period.
# It prints the image's size and user, and how long each step took.
#
# Every step is idempotent and logged ("step: ..."), so it works on a fresh machine of this kind
# (Debian 12, root, no registry reachable, no systemd) and on the second run alike:
# - podman, buildah, runc and debootstrap come from apt when missing;
# - containers.conf ($DIALER_IMAGE_WORK/containers.conf, named by CONTAINERS_CONF): runc, as
#   crun refuses the machine's hybrid cgroups, and default_ulimits no higher than the host's hard
#   limits, else setrlimit is refused at container start;
# - the base image: no registry answers here, so debootstrap makes a minimal bookworm from the
#   Debian mirror apt already uses, imported once as localhost/debian:bookworm-slim;
# - the Rust stage is replaced by the binary CI already compiled (BINARY_STAGE=prebuilt): the
#   Dockerfile still compiles by itself for a plain `docker build .`;
# - `--format docker`, as the OCI format drops HEALTHCHECK; no systemd runs the healthcheck
#   timer, so this script calls `podman healthcheck run` itself.
set -euo pipefail

DEPLOY=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$DEPLOY")
WORKDIR=${DIALER_IMAGE_WORK:-/tmp/dialer-image}
BASE_IMAGE=localhost/debian:bookworm-slim
IMAGE=${DIALER_IMAGE:-localhost/dialer:ci}
CONTAINER=dialer-image-smoke-$$
VHOST=dialer-image-smoke
GRACE_SECONDS=10
export DEBIAN_FRONTEND=noninteractive

STARTED=$(date +%s)
RUN=$(mktemp -d /tmp/dialer-image-smoke.XXXXXX)
SIM_PID=
cleanup() {
  podman rm -f -t 0 "$CONTAINER" >/dev/null 2>&1 || true
  if [ -n "$SIM_PID" ]; then kill "$SIM_PID" 2>/dev/null || true; fi
  rabbitmqctl -q delete_vhost "$VHOST" >/dev/null 2>&1 || true
  rm -rf "$RUN"
}
trap cleanup EXIT

step_started=
step() { # step DESCRIPTION: logs the start of a step, and how long the previous one took
  local now
  now=$(date +%s)
  if [ -n "$step_started" ]; then echo "      ($((now - step_started))s)"; fi
  step_started=$now
  echo "step: $*"
}
fail() {
  echo "FAIL: $*" >&2
  exit 1
}

# ------------------------------------------------------------------------------ tools
step "podman, buildah, runc, debootstrap"
missing=()
for tool in podman buildah runc debootstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]} (apt)"
  apt-get update -qq
  apt-get install -y -qq podman buildah runc debootstrap >/dev/null
fi
echo "$(podman --version), $(buildah --version | awk '{print $1, $2, $3}'), $(runc --version | awk 'NR == 1')"

mkdir -p "$WORKDIR"
export CONTAINERS_CONF=$WORKDIR/containers.conf
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
[ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ] && nproc=32768
cat >"$CONTAINERS_CONF.new" <<EOF
# Written by deploy/image-smoke.sh.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
mv "$CONTAINERS_CONF.new" "$CONTAINERS_CONF"
echo "CONTAINERS_CONF=$CONTAINERS_CONF (runc, nofile=$nofile, nproc=$nproc)"

# ------------------------------------------------------------------------------ base image
step "base image $BASE_IMAGE"
# Made like the registry's debian:bookworm-slim: apt keeps no package caches, dpkg installs no
# documentation, man pages or translations (so the image's apt-get layer stays small). The
# label says which revision of this recipe made it; an image of another revision is remade.
BASE_REVISION=2
if [ "$(podman image inspect --format '{{index .Config.Labels "dialer.base-revision"}}' "$BASE_IMAGE" 2>/dev/null)" = "$BASE_REVISION" ]; then
  echo "already there"
else
  # The mirror apt already uses (deb822 sources first, then sources.list).
  mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $0 ~ /bookworm/ && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
  rootfs=$WORKDIR/rootfs
  rm -rf "$rootfs" # a half-made tree from an interrupted run
  echo "debootstrap --variant=minbase bookworm $rootfs $mirror"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$WORKDIR/debootstrap.log" 2>&1 ||
    { tail -n 30 "$WORKDIR/debootstrap.log"; fail "debootstrap"; }
  [ -d "$rootfs/etc/apt" ] && [ -d "$rootfs/etc/dpkg" ] || fail "debootstrap left no tree in $rootfs"
  printf '%s\n' \
    'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };' \
    'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };' \
    'Dir::Cache::pkgcache "";' 'Dir::Cache::srcpkgcache "";' >"$rootfs/etc/apt/apt.conf.d/docker-clean"
  printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
    'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' \
    >"$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim"
  # Inside the new tree only (the guard above makes sure $rootfs is one).
  find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright -type f -delete
  rm -rf "${rootfs:?}"/usr/share/man/* "${rootfs:?}"/usr/share/info/* "${rootfs:?}"/usr/share/locale/* \
    "${rootfs:?}"/var/cache/apt/archives/*.deb "${rootfs:?}"/var/cache/apt/*.bin "${rootfs:?}"/var/lib/apt/lists/*
  podman rmi -f "$BASE_IMAGE" >/dev/null 2>&1 || true
  tar -C "$rootfs" -c . | podman import --change 'CMD ["bash"]' \
    --change "LABEL dialer.base-revision=$BASE_REVISION" - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
fi
echo "$(podman image inspect --format '{{.Id}}' "$BASE_IMAGE" | cut -c1-12), $(($(podman image inspect --format '{{.Size}}' "$BASE_IMAGE") / 1024 / 1024)) MiB"

# ------------------------------------------------------------------------------ the image
BIN=${DIALER_BIN:-$ROOT/target/release/dialer}
[ -x "$BIN" ] || fail "no binary at $BIN: run cargo build --release --locked first (or set DIALER_BIN)"
step "podman build (Dockerfile, prebuilt binary ${BIN#"$ROOT"/})"
# A context of its own: the repository's .dockerignore keeps target/ out, as it should for
# `docker build .`; here the binary is the only thing the build copies.
context=$RUN/context
mkdir -p "$context"
cp "$BIN" "$context/dialer"
podman build --pull=never --format docker -q \
  --build-arg RUNTIME_IMAGE="$BASE_IMAGE" \
  --build-arg BINARY_STAGE=prebuilt --build-arg BINARY=dialer \
  -f "$ROOT/Dockerfile" -t "$IMAGE" "$context" >"$RUN/build.log" 2>&1 ||
  { tail -n 40 "$RUN/build.log"; fail "podman build"; }

size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
user=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
healthcheck=$(podman image inspect --format '{{json .Config.Healthcheck}}' "$IMAGE")
echo "image $IMAGE: $((size / 1024 / 1024)) MiB, user $user"
[ -n "$user" ] && [ "${user%%:*}" != 0 ] && [ "${user%%:*}" != root ] || fail "the image runs as root (USER '$user')"
[ "$healthcheck" != null ] && [ -n "$healthcheck" ] || fail "the image has no HEALTHCHECK (built without --format docker?)"

# ------------------------------------------------------------------------------ run it
step "the simulator on the host, a vhost $VHOST"
rabbitmq-diagnostics -q ping >/dev/null 2>&1 || fail "no RabbitMQ answering on this machine"
rabbitmqctl -q delete_vhost "$VHOST" >/dev/null 2>&1 || true
rabbitmqctl -q add_vhost "$VHOST"
rabbitmqctl -q set_permissions -p "$VHOST" guest '.*' '.*' '.*'
AMQP="amqp://guest:guest@127.0.0.1:5672/$VHOST"
cp "$BIN" "$RUN/dialer-host"
env -i PATH="$PATH" DIALER_SIM_ADDR=127.0.0.1:0 "$RUN/dialer-host" sim >"$RUN/sim.log" 2>&1 &
SIM_PID=$!

wait_for() { # wait_for SECONDS COMMAND...: polls every 0.2 s
  local deadline=$(($(date +%s) + $1))
  shift
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}
http_get() ( # http_get HOST:PORT PATH -> the response (status line first); bash only
  exec 3<>"/dev/tcp/${1%:*}/${1##*:}" || exit 1
  printf 'GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n' "$2" >&3
  cat <&3
)
wait_for 20 grep -q 'listening on http://' "$RUN/sim.log" || { cat "$RUN/sim.log"; fail "the simulator did not start"; }
SIM=$(grep -o 'listening on http://[0-9.:]*' "$RUN/sim.log" | awk 'NR == 1 {print $3}')
echo "simulator at $SIM"
# A free port for the worker's /metrics: the container shares the host's network, so that the
# simulator on the host's loopback counts as loopback for the worker (plain http is refused
# to anything else).
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

step "podman run $IMAGE (dialer run, --network host, metrics on 127.0.0.1:$PORT)"
podman run -d --name "$CONTAINER" --network host --stop-timeout $((GRACE_SECONDS + 15)) \
  -e DIALER_AMQP_URL="$AMQP" -e DIALER_METRICS_ADDR="127.0.0.1:$PORT" \
  -e GENESYS_API_BASE_URL="$SIM" -e GENESYS_LOGIN_BASE_URL="$SIM" \
  -e GENESYS_CLIENT_ID=demo -e GENESYS_CLIENT_SECRET=demo-secret \
  -e DIALER_RATE_LIMIT=20/s -e DIALER_SHUTDOWN_GRACE="${GRACE_SECONDS}s" \
  -e DIALER_WORKER_NAME=image-smoke \
  "$IMAGE" >/dev/null 2>"$RUN/run.err" || { cat "$RUN/run.err"; fail "podman run"; }
# (podman logs that it cannot reach systemd to schedule the healthcheck timer: expected here.)
uid=$(podman exec "$CONTAINER" id -u)
echo "the worker runs as uid $uid ($(podman exec "$CONTAINER" id -un))"
[ "$uid" != 0 ] || fail "the container runs as root"

ready() { http_get "127.0.0.1:$PORT" /readyz 2>/dev/null | awk 'NR == 1 && / 200 / {ok = 1} END {exit !ok}'; }
wait_for 60 ready || { podman logs "$CONTAINER" | tail -n 30; fail "/readyz never answered 200"; }
echo "/readyz 200"
podman healthcheck run "$CONTAINER" >/dev/null || { podman logs "$CONTAINER" | tail -n 30; fail "HEALTHCHECK fails on a ready worker"; }
echo "HEALTHCHECK: $(podman inspect --format '{{.State.Health.Status}}' "$CONTAINER" 2>/dev/null || echo healthy)"

step "a job through the container"
echo '{"jobId":"image-smoke-1","agentEmail":"agent1@example.com","phoneNumber":"+14155552671"}' |
  env -i PATH="$PATH" DIALER_AMQP_URL="$AMQP" "$RUN/dialer-host" enqueue --no-validate >"$RUN/enqueue.log" 2>&1 ||
  { cat "$RUN/enqueue.log"; fail "dialer enqueue"; }
placed() {
  http_get "127.0.0.1:$PORT" /metrics 2>/dev/null | grep -E '^dialer_jobs_completed_total\{.*outcome="placed".*\} [1-9]' >/dev/null
}
wait_for 30 placed || { podman logs "$CONTAINER" | tail -n 30; fail "the job was not placed"; }
calls=$(http_get "${SIM#http://}" /sim/calls)
echo "$calls" | grep -q 'image-smoke-1' || fail "the simulator saw no call for image-smoke-1: $calls"
echo "placed: the simulator saw the call of image-smoke-1"

step "SIGTERM (podman stop) with a call in flight, grace ${GRACE_SECONDS}s"
# The simulator answers after 3 s from now on: the job below is mid-call when SIGTERM comes,
# and the worker must finish it (not drop it) and still exit 0 within the grace period.
http_put() ( # http_put HOST:PORT PATH BODY -> the response
  exec 3<>"/dev/tcp/${1%:*}/${1##*:}" || exit 1
  printf 'PUT %s HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %s\r\n\r\n%s' "$2" "${#3}" "$3" >&3
  cat <&3
)
http_put "${SIM#http://}" /sim/faults '{"latencyMs": 3000}' | awk 'NR == 1' | grep -q ' 200 ' || fail "the simulator refused the latency fault"
echo '{"jobId":"image-smoke-2","agentEmail":"agent1@example.com","phoneNumber":"+14155552672"}' |
  env -i PATH="$PATH" DIALER_AMQP_URL="$AMQP" "$RUN/dialer-host" enqueue --no-validate >>"$RUN/enqueue.log" 2>&1 ||
  { cat "$RUN/enqueue.log"; fail "dialer enqueue"; }
in_flight() {
  http_get "127.0.0.1:$PORT" /metrics 2>/dev/null | grep -E '^dialer_jobs_in_flight(\{[^}]*\})? [1-9]' >/dev/null
}
wait_for 20 in_flight || { podman logs "$CONTAINER" | tail -n 30; fail "the second job never got in flight"; }
echo "a job is in flight"
before=$(date +%s%N)
podman stop -t $((GRACE_SECONDS + 15)) "$CONTAINER" >/dev/null 2>>"$RUN/run.err"
took_ms=$((($(date +%s%N) - before) / 1000000))
code=$(podman inspect --format '{{.State.ExitCode}}' "$CONTAINER")
echo "exit code $code after ${took_ms} ms"
podman logs "$CONTAINER" 2>&1 | tail -n 3
[ "$code" = 0 ] || fail "the worker exited $code on SIGTERM"
[ "$took_ms" -lt $((GRACE_SECONDS * 1000)) ] || fail "the worker took ${took_ms} ms to stop, above the grace of ${GRACE_SECONDS}s"
http_get "${SIM#http://}" /sim/calls | grep -q 'image-smoke-2' || fail "the call in flight at SIGTERM was not completed"
echo "the call in flight at SIGTERM was completed before the exit"

step "done"
echo "image smoke: ok, image $IMAGE $((size / 1024 / 1024)) MiB, user $user, in $(($(date +%s) - STARTED))s"
