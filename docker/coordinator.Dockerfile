# The drover-coordinator image: the Fargate service of infra/fleet.yaml
# (config in /etc/drover/coordinator.toml, state in DynamoDB, local blobs in
# /var/lib/drover). Build from the repository root:
#
#   docker build -f docker/coordinator.Dockerfile -t <ecr>/drover-coordinator:1.2.3 .
#
# Base images (pulled at build time; this project's development machine
# reaches no registry, so its tests build
# docker/coordinator.scratch.Dockerfile instead):
#   build    rust:1.88-bookworm                   the workspace's rust-version
#   runtime  gcr.io/distroless/cc-debian12:nonroot  glibc, libgcc_s and CA
#            roots, no shell; runs as uid 65532
ARG RUST_VERSION=1.88

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p drover-coordinator --bin drover-coordinator \
    && install -D -m 0755 target/release/drover-coordinator /out/drover-coordinator \
    && install -d -m 0700 /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/drover-coordinator /usr/local/bin/drover-coordinator
# The data directory exists and belongs to the runtime user, for a volume
# mounted over it as for none.
COPY --from=build --chown=65532:65532 /out/data /var/lib/drover
EXPOSE 7070 7080
ENTRYPOINT ["/usr/local/bin/drover-coordinator"]
