#!/bin/bash
# Drover agent boot: the instance's user-data (launch templates in
# infra/fleet.yaml carry this file verbatim).
#
# `drover-agent bootstrap` reads the group's instance tags from IMDSv2
# (drover:coordinator, drover:pool, drover:join-token-parameter,
# drover:lifecycle-hook), fetches the join token, writes
# /etc/drover/agent.toml (0600) and, when anything is missing, says what and
# marks the instance Unhealthy so its group replaces it.
set -euo pipefail

/usr/local/bin/drover-agent bootstrap
systemctl enable --now drover-agent.service ||
  /usr/local/bin/drover-agent bootstrap --fail "drover-agent.service did not start"
