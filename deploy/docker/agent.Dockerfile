# syntax=docker/dockerfile:1
# punch-agent. Build from the repository root:
#   docker build -f deploy/docker/agent.Dockerfile -t punch-agent .
# Runs `punch-agent serve` by default; any other command works too:
#   docker run --rm -e PUNCH_SERVER=… -e PUNCH_SERVER_FINGERPRINT=… punch-agent nat-check

# The toolchain .ci/run uses; build and runtime stages share one Debian
# release so the binary finds the glibc it was linked against.
ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm
# Where the binary, its man pages and completions come from: the build
# stage below (default), or from
# deploy/docker/prebuilt/punch-agent/ (the binary and share/), built on a
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
    cargo build --release --locked -p punch-agent-cli \
 && install -D target/release/punch-agent /out/punch-agent
# Man pages and bash/zsh/fish completions, generated from the binary
# itself (`punch-agent man`, `punch-agent completions SHELL`).
RUN /out/punch-agent man --out /out/share/man/man1 >/dev/null \
 && install -d /out/share/bash-completion/completions /out/share/zsh/site-functions /out/share/fish/vendor_completions.d \
 && /out/punch-agent completions bash > /out/share/bash-completion/completions/punch-agent \
 && /out/punch-agent completions zsh > /out/share/zsh/site-functions/_punch-agent \
 && /out/punch-agent completions fish > /out/share/fish/vendor_completions.d/punch-agent.fish

FROM scratch AS prebuilt
COPY deploy/docker/prebuilt/punch-agent/ /out/

FROM ${BINARIES} AS binaries

FROM debian:${DEBIAN}-slim
# ca-certificates: the system roots that check an HTTPS front's certificate
# on the TCP channel (the server's own pinned key needs none).
# busybox: only its wget, for HEALTHCHECK.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates busybox \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 punch \
 && useradd --system --uid 10001 --gid punch --home-dir /var/lib/punch-agent \
      --shell /usr/sbin/nologin punch \
 && install -d -o punch -g punch -m 0700 /var/lib/punch-agent
COPY --from=binaries /out/punch-agent /usr/local/bin/punch-agent
COPY --from=binaries /out/share /usr/local/share
USER 10001:10001
# An agent with an id keeps its key at $XDG_DATA_HOME/punch/agent.key (or
# PUNCH_KEY_FILE). The server binds the id to that key: mount a volume here,
# or a new container cannot take its id back (exit 9, id_taken).
ENV XDG_DATA_HOME=/var/lib/punch-agent
# `serve` answers GET /healthz on 0.0.0.0:$PORT (200 while registered).
# Cloud Run sets PORT itself.
ENV PORT=8080
EXPOSE 8080/tcp
# The shell form on purpose: ${PORT} is expanded when the check runs.
# hadolint ignore=DL3025
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD busybox wget -q -O /dev/null "http://127.0.0.1:${PORT}/healthz" || exit 1
ENTRYPOINT ["punch-agent"]
CMD ["serve"]
