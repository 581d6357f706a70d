#!/bin/bash
# Provisions a Drover agent image on Amazon Linux 2023 (run by Packer as root,
# files already in /tmp/drover). DROVER_GPU=1 adds the NVIDIA driver and the
# NVIDIA Container Toolkit; nvidia-smi is checked after the reboot that follows.
set -euo pipefail

GPU="${DROVER_GPU:-0}"
SRC=/tmp/drover

dnf -y install docker logrotate iptables-nft
install -m 0644 "${SRC}/docker-daemon.json" /etc/docker/daemon.json
systemctl enable docker.service

install -m 0755 "${SRC}/drover-agent" /usr/local/bin/drover-agent
/usr/local/bin/drover-agent --version
install -m 0644 "${SRC}/drover-agent.service" /etc/systemd/system/drover-agent.service
install -m 0644 "${SRC}/drover-imds-block.service" /etc/systemd/system/drover-imds-block.service
install -m 0644 "${SRC}/drover-fence.service" /etc/systemd/system/drover-fence.service
install -m 0644 "${SRC}/drover-fence.timer" /etc/systemd/system/drover-fence.timer
install -d -m 0755 /etc/systemd/journald.conf.d /var/log/drover
install -m 0644 "${SRC}/journald-drover.conf" /etc/systemd/journald.conf.d/drover.conf
install -m 0644 "${SRC}/logrotate-drover" /etc/logrotate.d/drover
# Enabled by user-data once /etc/drover/agent.toml exists; the IMDS block and
# the fence watchdog always (it does nothing until the agent has a session).
systemctl enable drover-imds-block.service drover-fence.timer

if [ "${GPU}" = "1" ]; then
  dnf -y install "kernel-devel-$(uname -r)" "kernel-modules-extra-$(uname -r)" dkms
  dnf config-manager --add-repo \
    https://developer.download.nvidia.com/compute/cuda/repos/amzn2023/x86_64/cuda-amzn2023.repo
  dnf -y module install nvidia-driver:latest-dkms
  curl -fsSL https://nvidia.github.io/libnvidia-container/stable/rpm/nvidia-container-toolkit.repo \
    -o /etc/yum.repos.d/nvidia-container-toolkit.repo
  dnf -y install nvidia-container-toolkit
  nvidia-ctk runtime configure --runtime=docker
fi

dnf clean all
rm -rf "${SRC}"
