# syntax=docker/dockerfile:1
#
# offsite container image: `offsite` (the entrypoint) and `offsite-workload`
# (a deterministic SQLite writer, used as the example application in
# docker-compose.yml). See docs/DEPLOY.md.
#
#   docker build -t offsite:local .
#   docker run --rm offsite:local --help
#
# A second image, PostgreSQL 15 with offsite (restores with --start, drills,
# archive_command mode), is the stage `postgres`:
#
#   docker build --target postgres -t offsite:postgres .

ARG RUST_VERSION=1.95

# ---------------------------------------------------------------------------
# Build stage. rust:*-slim ships gcc and libc6-dev, which the C parts need
# (bundled SQLite, zstd, aws-lc via its cc builder); nothing else is installed.
# ---------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src

# Dependencies first, against stub sources: this layer is rebuilt only when
# Cargo.toml or Cargo.lock change, not on every source edit.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin benches \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > src/bin/offsite-workload.rs \
 && echo 'fn main() {}' > benches/restore_history.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --bins \
 && rm -rf src

# The real sources. COPY keeps the files' own (older) modification times, so
# touch them: otherwise cargo would take the stub build as up to date.
COPY src src
RUN find src -name '*.rs' -exec touch {} + \
 && cargo build --release --locked --bins \
 && mkdir -p /out/bin /out/data /out/restore \
 && mkdir -m 1777 /out/tmp \
 && cp target/release/offsite target/release/offsite-workload /out/bin/

# ---------------------------------------------------------------------------
# PostgreSQL variant (a named stage; build it with --target postgres):
# PostgreSQL 15's server programs (pg_ctl, postgres in /usr/lib/postgresql/15/bin,
# where offsite looks for them) and offsite at /usr/local/bin/offsite. For
#   - restores with --start (offsite starts PostgreSQL on the restored data
#     directory and waits until recovery reaches the target),
#   - restore drills (offsite verify --deep),
#   - the PostgreSQL server itself in archive_command mode (archive_command =
#     offsite pg archive-push …), and any server whose restore_command is
#     offsite's `pg wal-fetch`.
# The official image's entrypoint and CMD stay (it is still a PostgreSQL
# server image); restore jobs override the entrypoint with `offsite`.
#
#   docker build --target postgres -t offsite:postgres .
#
# Before the runtime stage on purpose: the last stage is what a plain
# `docker build .` makes, and that stays the distroless sidecar image.
# Same Debian release (bookworm) as the build stage, so glibc matches.
# ---------------------------------------------------------------------------
FROM postgres:15-bookworm AS postgres

# CA certificates for HTTPS to S3 (the S3 client verifies against /etc/ssl/certs).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/bin/offsite /usr/local/bin/offsite

# The image's postgres user (uid and gid 999 in the official image), numeric so
# Kubernetes' runAsNonRoot can verify it. Running as postgres, offsite restore
# needs no chown and starts the server itself (no runuser).
USER 999:999

# ---------------------------------------------------------------------------
# Runtime stage: distroless "cc" = glibc + libgcc + CA certificates (the S3
# client verifies HTTPS against the system store, /etc/ssl/certs), no shell,
# no package manager. Same Debian release as the build stage, so glibc matches.
# ---------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot

COPY --from=build /out/bin/offsite /out/bin/offsite-workload /usr/local/bin/
# Mount points owned by the runtime user: a fresh named volume mounted here
# takes this ownership, so the non-root user can create the database in it.
COPY --from=build --chown=65532:65532 /out/data /data
COPY --from=build --chown=65532:65532 /out/restore /restore
# offsite stages uploads in the temp dir (spool-dir); with a read-only root
# filesystem mount a writable volume here (Kubernetes: an emptyDir).
COPY --from=build /out/tmp /tmp

# Numeric, so Kubernetes' runAsNonRoot can verify it (65532 = distroless "nonroot").
USER 65532:65532
WORKDIR /data

# No HEALTHCHECK: the image has no shell or curl to run one. Probe offsite's own
# HTTP listener instead (`--listen`; GET /healthz, /readyz), e.g. with a
# Kubernetes httpGet probe or Prometheus; see docs/DEPLOY.md.
ENTRYPOINT ["offsite"]
CMD ["--help"]
