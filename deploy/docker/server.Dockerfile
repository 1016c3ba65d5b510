# syntax=docker/dockerfile:1
# punch-server. Build from the repository root:
#   docker build -f deploy/docker/server.Dockerfile -t punch-server .
# The binary alone (for a VM with deploy/systemd; glibc of Debian 12):
#   docker build -f deploy/docker/server.Dockerfile --target bin -o deploy/gcp/out .

# The toolchain .ci/run uses; build and runtime stages share one Debian
# release so the binary finds the glibc it was linked against.
ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm
# Where the binary, its man pages and completions come from: the build
# stage below (default), or from
# deploy/docker/prebuilt/punch-server/ (the binary and share/), built on a
# Debian 12 host, with `docker build --build-arg BINARIES=prebuilt`
# (deploy/containers.sh builds so, and CI compiles once).
ARG BINARIES=build

FROM rust:${RUST_VERSION}-slim-${DEBIAN} AS build
WORKDIR /src
COPY . .
# The release profile keeps debug info for profiling; an image wants size.
ENV CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p punch-server \
 && install -D target/release/punch-server /out/punch-server
# Man pages and bash/zsh/fish completions, generated from the binary
# itself (`punch-server man`, `punch-server completions SHELL`).
RUN /out/punch-server man --out /out/share/man/man1 >/dev/null \
 && install -d /out/share/bash-completion/completions /out/share/zsh/site-functions /out/share/fish/vendor_completions.d \
 && /out/punch-server completions bash > /out/share/bash-completion/completions/punch-server \
 && /out/punch-server completions zsh > /out/share/zsh/site-functions/_punch-server \
 && /out/punch-server completions fish > /out/share/fish/vendor_completions.d/punch-server.fish

FROM scratch AS bin
COPY --from=build /out/punch-server /

FROM scratch AS prebuilt
COPY deploy/docker/prebuilt/punch-server/ /out/

FROM ${BINARIES} AS binaries

FROM debian:${DEBIAN}-slim
# busybox only for its wget in HEALTHCHECK (curl would pull in ~10 MB).
RUN apt-get update \
 && apt-get install -y --no-install-recommends busybox \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 punch \
 && useradd --system --uid 10001 --gid punch --home-dir /var/lib/punch-server \
      --shell /usr/sbin/nologin punch \
 && install -d -o punch -g punch -m 0700 /var/lib/punch-server
COPY --from=binaries /out/punch-server /usr/local/bin/punch-server
COPY --from=binaries /out/share /usr/local/share
USER 10001:10001
# server.key (the fingerprint agents pin) and bindings.redb live here: mount
# a volume, or every new container is a new server to the agents.
ENV PUNCH_DATA_DIR=/var/lib/punch-server
ENV PUNCH_LISTEN=0.0.0.0:3478
# The HTTP listener must leave loopback for health checks to reach it. Its
# API and status page need the bearer token (set PUNCH_TOKEN; without it the
# server is open and logs so); /healthz and /metrics stay open for probes.
# Do not publish 8080 to the internet.
ENV PUNCH_HTTP=0.0.0.0:8080
# UDP: QUIC signaling, STUN and the relay. TCP: TLS + WebSocket for agents
# whose UDP is blocked (same port by default). 8080: HTTP.
EXPOSE 3478/udp 3478/tcp 8080/tcp
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
  CMD ["busybox", "wget", "-q", "-O", "/dev/null", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["punch-server"]
