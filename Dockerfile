# syntax=docker/dockerfile:1
#
# The dialer image: `dialer run` by default; the same image runs `dialer sim`, `dialer check`,
# `dialer dlq ...` and the other commands (ENTRYPOINT is the binary).
#
# Build from the repository root (the context must hold Cargo.toml, Cargo.lock and src/):
#   docker build -t dialer:0.1.0 .
# .dockerignore keeps target/ and .git out of the context.
#
# CI (.ci/run → deploy/image-smoke.sh) builds it with podman and smoke-tests the image: it
# passes the binary CI already compiled (`--build-arg BINARY=...`, the `prebuilt` stage) instead
# of compiling Rust a second time, and a base image made with debootstrap (`RUNTIME_IMAGE`).
# A plain `docker build .` compiles in the `builder` stage below.

ARG RUST_IMAGE=rust:1-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim
# `builder` compiles from source; `prebuilt` takes a binary from the build context
# (BINARY_STAGE=prebuilt BINARY=path/in/context): what CI does with the binary it built. The
# repository's .dockerignore leaves target/ out, so image-smoke.sh builds from a context of
# its own that holds just the binary.
ARG BINARY_STAGE=builder

FROM ${RUST_IMAGE} AS builder
WORKDIR /build

# Dependency layer: build every dependency against stub sources, so that a change to src/
# rebuilds only the dialer crate. Rebuilt only when Cargo.toml or Cargo.lock change. The stubs
# stand for the two targets `cargo build` compiles: the library and the `dialer` binary
# (tests/ is not needed to build them, so it is not copied at all).
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --no-default-features \
 && rm -rf src

# The real sources. touch: the stubs' build is newer than the copied files' mtimes.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --no-default-features \
 && install -m 0755 target/release/dialer /usr/local/bin/dialer

# A binary compiled outside (CI's release build, against the glibc of bookworm or older).
# Unused, and so not built, unless BINARY_STAGE=prebuilt.
FROM ${RUNTIME_IMAGE} AS prebuilt
ARG BINARY=target/release/dialer
COPY ${BINARY} /usr/local/bin/dialer

FROM ${BINARY_STAGE} AS binary

FROM ${RUNTIME_IMAGE}

# ca-certificates: the worker talks https to Genesys Cloud (and amqps to a broker, if used).
# Versions are not pinned: bookworm's security updates should land on every rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# A fixed non-root uid, so Kubernetes' runAsNonRoot can verify it and fsGroup/volume ownership
# are predictable.
RUN groupadd --system --gid 10001 dialer \
 && useradd --system --uid 10001 --gid dialer --home-dir /var/lib/dialer --shell /usr/sbin/nologin dialer \
 && install -d -o dialer -g dialer -m 0750 /var/lib/dialer

COPY --from=binary /usr/local/bin/dialer /usr/local/bin/dialer

# The decision store (SQLite) lives here: keep it on a volume, one worker per volume.
ENV DIALER_STATE_DIR=/var/lib/dialer \
    DIALER_METRICS_ADDR=0.0.0.0:9464 \
    DIALER_LOG_FORMAT=json
VOLUME ["/var/lib/dialer"]
WORKDIR /var/lib/dialer
USER 10001:10001

# /metrics, /healthz, /readyz
EXPOSE 9464

# Liveness, not readiness: /healthz fails only when the worker is wedged (jobs or the runtime
# stood still for DIALER_LIVENESS_TIMEOUT); a worker that waits for the broker or for valid
# credentials is alive and recovers by itself, and restarting it would not help. No curl in the image: bash
# (always in Debian) speaks enough HTTP/1.0 over /dev/tcp to read the status line.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${DIALER_METRICS_ADDR##*:} && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]

# SIGTERM: stop taking jobs, finish those in flight within DIALER_SHUTDOWN_GRACE (20s by
# default), requeue the rest, exit 0. Give the container more than that to stop:
# `docker stop -t 30`, compose `stop_grace_period: 30s` (Docker's default is only 10s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["dialer"]
CMD ["run"]
