# syntax=docker/dockerfile:1
# walletq worker image. Build: docker build -t walletq .  (or: docker compose build)

# --- build -------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
# The whole source tree (see .dockerignore): src/, migrations/ (embedded at
# compile time), Cargo.toml and Cargo.lock, and bench/ (a workspace member: cargo reads its
# manifest, but `-p walletq` never compiles it or its dependencies).
COPY . .
# Cache mounts keep the crate registry and build artifacts between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p walletq --bin walletq \
    && install -m 0755 target/release/walletq /usr/local/bin/walletq

# --- runtime -----------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin walletq
COPY --from=builder /usr/local/bin/walletq /usr/local/bin/walletq
USER walletq
# Prometheus metrics (WALLETQ_METRICS_ADDR); the HTTP gateway (`gateway --listen 0.0.0.0:8080`).
EXPOSE 9100 8080
ENTRYPOINT ["/usr/local/bin/walletq"]
CMD ["worker"]
