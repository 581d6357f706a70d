#!/bin/bash
# Drover agent boot: the instance's user-data (launch templates in
# infra/fleet.yaml carry this file verbatim).
#
# STAND-IN for `drover-agent bootstrap` (not written yet): reads the
# group's settings from instance tags (IMDSv2), fetches the join token
# from SSM (a Secrets Manager reference), writes /etc/drover/agent.toml
# and starts the agent. Any failure marks the instance Unhealthy so its
# group replaces it instead of letting it idle.
set -euo pipefail

imds() {
  local token
  token=$(curl -sf -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' \
    http://169.254.169.254/latest/api/token) &&
    curl -sf -H "X-aws-ec2-metadata-token: ${token}" \
      "http://169.254.169.254/latest/meta-data/$1"
}

INSTANCE_ID=$(imds instance-id)
REGION=$(imds placement/region)

fail() {
  echo "drover user-data: $*" >&2
  aws autoscaling set-instance-health --region "${REGION}" \
    --instance-id "${INSTANCE_ID}" --health-status Unhealthy \
    --no-should-respect-grace-period || true
  exit 1
}

# The group's tags, propagated to its instances (needs instance metadata tags).
tag() { imds "tags/instance/$1" || fail "instance tag $1 is missing"; }
COORDINATOR=$(tag drover:coordinator)
POOL=$(tag drover:pool)
TOKEN_PARAMETER=$(tag drover:join-token-parameter)
LIFECYCLE_HOOK=$(tag drover:lifecycle-hook)

JOIN_TOKEN=$(aws ssm get-parameter --region "${REGION}" --with-decryption \
  --name "${TOKEN_PARAMETER}" --query Parameter.Value --output text) ||
  fail "cannot read the join token from SSM parameter ${TOKEN_PARAMETER}"

umask 077
mkdir -p /etc/drover
cat >/etc/drover/agent.toml <<EOF
coordinator = "${COORDINATOR}"
join_token = "${JOIN_TOKEN}"
pool = "${POOL}"
lifecycle_hook = "${LIFECYCLE_HOOK}"
data_dir = "/var/lib/drover"
EOF

systemctl enable --now drover-agent.service || fail "drover-agent did not start"
