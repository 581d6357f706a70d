# The drover-agent image: the ECS Fargate worker pool of infra/fleet.yaml
# (`DROVER_PLATFORM=fargate`, `DROVER_RUNTIME=process`: jobs are shell
# commands in this container). Build from the repository root:
#
#   docker build -f docker/agent.Dockerfile -t <ecr>/drover-agent:1.2.3 .
#
# Base images (pulled at build time; this project's development machine
# reaches no registry, so its tests build docker/agent.scratch.Dockerfile
# instead):
#   build    rust:1.88-bookworm     the workspace's rust-version; protox
#                                   compiles the protos, no protoc needed
#   runtime  debian:bookworm-slim   glibc 2.36 for the binary, /bin/sh and
#                                   coreutils for `process` jobs, CA roots
ARG RUST_VERSION=1.88

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p drover-agent --bin drover-agent \
    && install -D -m 0755 target/release/drover-agent /out/drover-agent

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/drover --create-home drover
COPY --from=build /out/drover-agent /usr/local/bin/drover-agent
USER drover
WORKDIR /var/lib/drover
ENV DROVER_DATA_DIR=/var/lib/drover
ENTRYPOINT ["/usr/local/bin/drover-agent"]
