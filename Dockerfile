# syntax=docker/dockerfile:1
# s3-sql-loader container image.
#   docker build -t s3-sql-loader:0.1.0 .
#   docker run --rm -p 8080:8080 -v loader-data:/data --stop-timeout 40 s3-sql-loader:0.1.0
# See deploy/README.md for S3 + PostgreSQL, Kubernetes and ECS.

############################ builder ############################
FROM rust:1.95-slim-bookworm AS builder

# aws-lc-sys (rustls crypto), zstd-sys and the bundled SQLite are C code built by cc;
# cmake is aws-lc-sys's fallback build path. The rust image already has gcc and libc6-dev.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# 1) Dependency layer: build every dependency against a dummy crate with the real
#    Cargo.toml/Cargo.lock, so this layer stays cached while only src/ changes.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bin s3-sql-loader \
 && rm -rf src

# 2) The real source. Touch it so cargo rebuilds the crate (COPY keeps the old mtimes,
#    which may be older than the dummy's build).
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --bin s3-sql-loader \
 && cp target/release/s3-sql-loader /s3-sql-loader

############################ runtime ############################
FROM debian:bookworm-slim AS runtime

# ca-certificates: TLS to S3, CloudWatch, STS and the database.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 loader \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin loader \
 && mkdir -p /data /etc/s3-sql-loader \
 && chown 10001:10001 /data

COPY --from=builder /s3-sql-loader /usr/local/bin/s3-sql-loader
COPY config/container.toml /etc/s3-sql-loader/config.toml

# Only the config file location is set here. The source and database of the image
# (file:///data, sqlite:///data/loader.db) live in that file, NOT in ENV: environment
# variables win over the file, so an ENV LOADER_SOURCE__URL here would silently override
# a config file mounted by Kubernetes or ECS. Override with LOADER_<SECTION>__<KEY> at run time.
ENV LOADER_CONFIG=/etc/s3-sql-loader/config.toml

LABEL org.opencontainers.image.title="s3-sql-loader" \
      org.opencontainers.image.description="Loads flat files landing in S3 (or a local folder) into a SQL database exactly once." \
      org.opencontainers.image.licenses="Apache-2.0"

# Non-root; numeric so Kubernetes can verify runAsNonRoot. The root filesystem may be
# read-only: the loader writes only to /data (local source, SQLite) and /tmp.
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080

# The binary's own probe (GET http://127.0.0.1:8080/healthz): no shell or curl needed.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["/usr/local/bin/s3-sql-loader", "healthcheck"]

# SIGTERM stops claiming and lets in-flight loads finish within shutdown.grace (25s):
# give the container more than that to stop (docker run --stop-timeout 40).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/s3-sql-loader"]
CMD ["run"]
