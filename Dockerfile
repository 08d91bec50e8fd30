# syntax=docker/dockerfile:1
#
# The roomcast node image.
#
#   docker build -t roomcast:0.1.0 .
#   docker run --rm -p 8000:8000 roomcast:0.1.0            # one node, memory broker
#   docker run --rm -p 8000:8000 -e ROOMCAST_BROKER=redis://redis:6379 roomcast:0.1.0
#
# Configuration is by ROOMCAST_* environment variables and/or a TOML file named by
# ROOMCAST_CONFIG (docs/configuration.md). See docs/deployment.md for compose and Helm.

# The workspace's rust-version is 1.89; it is built and tested with 1.95.
ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep the registry and target/ between builds (BuildKit); the binary is
# copied out of the cached target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin roomcast \
    && install -m 0755 target/release/roomcast /usr/local/bin/roomcast

FROM debian:bookworm-slim
# ca-certificates: rediss://, tls:// and JWKS over https. curl: the HEALTHCHECK below and
# the docker-compose.yml healthchecks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 roomcast \
    && useradd --system --uid 10001 --gid roomcast --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin roomcast
COPY --from=build /usr/local/bin/roomcast /usr/local/bin/roomcast

# Inside a container the node must listen on all interfaces (its default is 127.0.0.1).
ENV ROOMCAST_LISTEN=0.0.0.0:8000
USER 10001:10001
EXPOSE 8000
# SIGTERM: the node stops accepting, sends close 4000 to every connection (clients
# reconnect to other nodes) and exits within ROOMCAST_SHUTDOWN_GRACE_MS (default 10 s):
# give the container a longer stop timeout than that (compose: stop_grace_period).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS -o /dev/null http://127.0.0.1:8000/readyz || exit 1

# Each WebSocket connection holds one file descriptor and the node does not raise its own
# limit: the entrypoint raises the soft open-files limit to the hard limit the container
# was given (docker run --ulimit nofile=N:N, compose `ulimits`), then execs the node, which
# stays PID 1 and gets SIGTERM itself. Arguments are passed on: `docker run IMAGE serve
# --config FILE`, or the client CLI, `docker run IMAGE sub lobby`.
ENTRYPOINT ["/bin/sh", "-c", "ulimit -n \"$(ulimit -Hn)\" 2>/dev/null || true; exec /usr/local/bin/roomcast \"$@\"", "roomcast"]
