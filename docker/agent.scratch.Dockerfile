# docker/agent.Dockerfile's local twin, for a machine that cannot pull base
# images: FROM scratch with a context staged by docker/scratch-context.sh
# (a locally built drover-agent and exactly the shared libraries `ldd` lists
# for it). Same entrypoint and environment as the production image; no shell,
# so `process` jobs cannot run in it.
#
#   cargo build --release --bin drover-agent
#   docker/scratch-context.sh target/release/drover-agent /tmp/agent-image
#   docker build -f docker/agent.scratch.Dockerfile -t drover-agent:scratch /tmp/agent-image
FROM scratch
COPY rootfs/ /
WORKDIR /var/lib/drover
ENV DROVER_DATA_DIR=/var/lib/drover
ENTRYPOINT ["/usr/local/bin/drover-agent"]
