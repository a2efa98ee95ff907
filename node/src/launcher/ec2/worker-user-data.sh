#!/bin/bash
# hashq worker {worker} of cluster {cluster}, launched by node {parent} ({parent_instance}).
# Fetches the hashq binary from the cluster's endpoints and runs `hashq worker` as a systemd
# service; when the worker ends (idle, orphaned, or failing for good) the instance powers
# off, and its shutdown behaviour terminates it. No AWS key is here: the worker uses the
# instance profile.
set -euo pipefail
umask 077
install -d -m 0700 /etc/hashq
cat > /etc/hashq/worker.env <<'HASHQ_ENV'
HASHQ_WORKER_TOKEN={token}
HASHQ_LOG_FORMAT=json
HASHQ_ENV

# A TLS cluster: the cluster CA, the only issuer the worker and curl trust.
curl_tls=()
{tls}
# The worker's handle is this instance's id (IMDSv2).
imds_token=$(curl -fsS --retry 5 -X PUT -H 'X-aws-ec2-metadata-token-ttl-seconds: 300' http://169.254.169.254/latest/api/token)
instance_id=$(curl -fsS --retry 5 -H "X-aws-ec2-metadata-token: $imds_token" http://169.254.169.254/latest/meta-data/instance-id)
echo "HASHQ_HANDLE=$instance_id" >> /etc/hashq/worker.env
echo "HASHQ_THREADS=$(nproc)" >> /etc/hashq/worker.env

# The binary, from the parent endpoint first (GET /internal/binary needs the token; curl
# reads the header from a root-only file so the token is never on a command line).
binary_urls='{binary_urls}'
sed -n 's/^HASHQ_WORKER_TOKEN=\(.*\)$/Authorization: Bearer \1/p' /etc/hashq/worker.env > /etc/hashq/auth.header
fetched=
for round in 1 2 3 4 5 6 7 8 9 10; do
  for url in $binary_urls; do
    if curl "${{curl_tls[@]}}" -fsS --connect-timeout 5 --max-time 600 -H @/etc/hashq/auth.header -o /usr/local/bin/hashq.part "$url"; then
      fetched=yes
      break 2
    fi
  done
  sleep $((round * 3))
done
rm -f /etc/hashq/auth.header
if [ -z "$fetched" ]; then
  echo "hashq: no endpoint served the binary; powering off" >&2
  shutdown -h now
  exit 1
fi
chmod 0755 /usr/local/bin/hashq.part
mv /usr/local/bin/hashq.part /usr/local/bin/hashq

cat > /etc/systemd/system/hashq-worker.service <<'HASHQ_UNIT'
[Unit]
Description=hashq worker {worker} of cluster {cluster}
Wants=network-online.target
After=network-online.target
StartLimitIntervalSec=600
StartLimitBurst=5
SuccessAction=poweroff
FailureAction=poweroff

[Service]
EnvironmentFile=/etc/hashq/worker.env
ExecStart=/usr/local/bin/hashq {args}
Restart=on-failure
RestartSec=5
ProtectHome=yes
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
HASHQ_UNIT
systemctl daemon-reload
systemctl enable --now hashq-worker.service
