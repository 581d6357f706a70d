# docker/coordinator.Dockerfile's local twin, for a machine that cannot pull
# base images: FROM scratch with a context staged by
# docker/scratch-context.sh (a locally built drover-coordinator and exactly
# the shared libraries `ldd` lists for it).
#
#   cargo build --release --bin drover-coordinator
#   docker/scratch-context.sh target/release/drover-coordinator /tmp/coordinator-image
#   docker build -f docker/coordinator.scratch.Dockerfile -t drover-coordinator:scratch /tmp/coordinator-image
FROM scratch
COPY rootfs/ /
EXPOSE 7070 7080
ENTRYPOINT ["/usr/local/bin/drover-coordinator"]
