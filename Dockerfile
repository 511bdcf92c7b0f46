# syntax=docker/dockerfile:1
# One multi-stage build for the five images; pick one with --target
# api|ingest-worker|indexer|webhook-dispatcher|counter-sync.
# --target tour is the README's tour (scripts/tour) in a small curl image: `skaffold verify` runs it
# against the deployed api.
# Dependencies are compiled in their own layer (cargo-chef), so editing the code rebuilds only the
# workspace crates. The runtime images are distroless (glibc, CA certificates, no shell) and run as
# the non-root user 65532.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /build

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
# The build never talks to a database: migrations are embedded from files, queries are checked at run time.
ENV SQLX_OFFLINE=true
COPY --from=planner /build/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json \
    -p api -p ingest-worker -p indexer -p webhook-dispatcher -p counter-sync
COPY . .
RUN cargo build --release --locked --bins -p api -p ingest-worker -p indexer -p webhook-dispatcher -p counter-sync

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
USER 65532:65532
ENV RUST_LOG=info

FROM runtime AS api
COPY --from=builder /build/target/release/api /usr/local/bin/api
ENV CHAT_HTTP_ADDR=0.0.0.0:3000
EXPOSE 3000
ENTRYPOINT ["/usr/local/bin/api"]

FROM runtime AS ingest-worker
COPY --from=builder /build/target/release/ingest-worker /usr/local/bin/ingest-worker
ENV CHAT_HEALTH_ADDR=0.0.0.0:9090
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/ingest-worker"]

FROM runtime AS indexer
COPY --from=builder /build/target/release/indexer /usr/local/bin/indexer
ENV CHAT_HEALTH_ADDR=0.0.0.0:9090
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/indexer"]

FROM runtime AS webhook-dispatcher
COPY --from=builder /build/target/release/webhook-dispatcher /usr/local/bin/webhook-dispatcher
ENV CHAT_HEALTH_ADDR=0.0.0.0:9090
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/webhook-dispatcher"]

FROM runtime AS counter-sync
COPY --from=builder /build/target/release/counter-sync /usr/local/bin/counter-sync
ENTRYPOINT ["/usr/local/bin/counter-sync"]

# The README's tour against CHAT_URL (http://chat-api in the cluster): POSIX sh and curl only. Needs no
# Rust build. Pinned by tag; runs as the same non-root user as the runtime images.
FROM curlimages/curl:8.15.0 AS tour
COPY scripts/tour /tour
USER 65532:65532
ENV CHAT_URL=http://chat-api
ENTRYPOINT ["sh", "/tour"]
CMD []
