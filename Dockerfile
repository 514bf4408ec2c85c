# syntax=docker/dockerfile:1.7
# session-operator image: a release build in the official Rust image, copied onto distroless
# (glibc + libgcc, no shell, no package manager), running as the distroless nonroot user.
#
#   docker build -t session-operator:0.1.0 .
#
# The binary uses rustls (no OpenSSL), so distroless/cc is all it needs at run time.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Whole workspace: Cargo needs every member's manifest and declared targets, and
# sqlx::migrate! embeds migrations/ at compile time.
COPY . .
# Without the default feature `lab`: the image's operator links no API server emulator, demo or
# benchmarks (scripts/test.sh checks that `cargo tree` of this build lists no kube-emulator).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --no-default-features --bin session-operator \
    && install -D -m 0755 target/release/session-operator /out/session-operator

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="session-operator" \
      org.opencontainers.image.description="Kubernetes operator for session-sticky web platforms" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/session-operator /usr/local/bin/session-operator
# distroless nonroot: uid/gid 65532, the ids the Helm chart's securityContext sets.
USER 65532:65532
# /healthz, /readyz, /metrics
EXPOSE 8080
# Health is checked by Kubernetes probes on /healthz and /readyz; the image has no shell or
# HTTP client to run a Docker HEALTHCHECK with.
HEALTHCHECK NONE
ENTRYPOINT ["/usr/local/bin/session-operator"]
CMD ["run"]
