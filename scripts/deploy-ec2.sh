#!/usr/bin/env bash
# Deploys a hashq cluster to AWS with the AWS CLI (README, "Running on AWS"), or removes one.
#
#   scripts/deploy-ec2.sh --binary-url URL --client-cidr CIDR [options]   deploy
#   scripts/deploy-ec2.sh --destroy [--name NAME]                         remove it all
#   scripts/deploy-ec2.sh --replace-endpoint ID --binary-url URL [options]
#                                     a new endpoint instance for node ID (terminated first if
#                                     it still runs), with a new node id: it joins through a
#                                     surviving node and swaps itself in (`hashq cluster replace`)
#
# It creates, all tagged hashq:cluster=NAME:
#   - two security groups: `cluster` (the cluster port, Raft + workers + internal routes, open
#     only to members of this same group) on every instance, and `client` (the client port,
#     serving the client API alone, open to --client-cidr) on the endpoints;
#   - two IAM roles with instance profiles under the path /hashq/NAME/: `node` (run, tag and
#     terminate this cluster's worker instances, describe instances, pass the worker role)
#     and `worker` (describe instances and their status, for the parent check);
#   - the voters: --endpoints endpoint instances (default 3) and --witness witness instances
#     (0 or 1), spread over the subnets given (default: the default VPC's subnets, one AZ per
#     node), each with a fixed private IP so every node's user data carries the peers list.
#     Their user data downloads `hashq` from --binary-url (S3 is not allowed by the exercise:
#     serve the release binary from any HTTPS host you trust, and pass --binary-sha256; build
#     it with the EC2 launcher: `cargo build --release --features ec2`) and
#     installs `hashq node --launcher ec2` as a systemd service with generated credentials (peer, worker, admin).
# Then it waits for a leader (skip with --no-wait, e.g. against an emulator whose instances
# run nothing) and prints the endpoint URLs. The credentials are kept in STATE_DIR/NAME.{token,worker-token,admin-token}.
#
# Options:
#   --name NAME              cluster name, the hashq:cluster tag (default: hashq)
#   --region REGION          AWS region (default: AWS_REGION, AWS_DEFAULT_REGION, CLI config)
#   --endpoint-url URL       EC2 and IAM API endpoint, e.g. an emulator (moto_server)
#   --binary-url URL         where the instances download the hashq binary (Linux x86_64,
#                            built with `--features ec2`)
#   --binary-sha256 HEX      its SHA-256, checked on each instance before it runs
#   --ami AMI                image for every instance (default: the latest Amazon Linux 2023)
#   --instance-type TYPE     endpoint instance type (default: t3.small)
#   --worker-instance-type T worker instance type (default: t3.micro)
#   --subnet ID              a subnet for the nodes, repeatable (node i gets subnet i mod n)
#   --client-cidr CIDR       who may reach the client port (required to deploy)
#   --client-port PORT       the client API port (default: 8080)
#   --port PORT              the cluster port (default: 7101)
#   --endpoints N            endpoint instances (default: 3)
#   --witness N              witness instances, 0 or 1 (default: 0)
#   --max-workers N          the cluster-wide worker budget (default: 8)
#   --worker-idle-timeout D  workers end after this long without work (default: 10m)
#   --key-name NAME          an EC2 key pair for SSH; with --ssh-cidr CIDR, port 22 opens
#   --state-dir DIR          where the credential files live (default: .hashq-ec2)
#   --tls                    TLS on every link: a cluster CA in STATE_DIR/NAME.tls (kept there,
#                            with its key) issues each node a certificate for its private IP
#                            and the name node-ID.NAME.hashq; nodes get theirs in user data,
#                            workers the CA. Clients use https://node-ID.NAME.hashq:PORT (map
#                            the name to the address printed) with --tls-ca STATE_DIR/NAME.tls/ca.pem
#   --hashq BIN              the local hashq that issues the certificates (default: hashq on
#                            PATH, else target/release/hashq, else target/debug/hashq)
#   --no-wait                do not wait for a leader
#   --destroy                terminate every instance tagged hashq:cluster=NAME (workers
#                            included), delete its security groups, roles and profiles
#   --replace-endpoint ID    replace endpoint node ID (dead or alive) by a new instance: same
#                            subnet, groups and profile, the image and type of a surviving
#                            node unless --ami/--instance-type say otherwise, the next unused
#                            node id, the credentials (and CA) kept in STATE_DIR. It joins with
#                            --join through a surviving node and runs `hashq cluster replace
#                            ID --id NEW` itself (the cluster port is not open to the operator)
set -euo pipefail

name=hashq
region=${AWS_REGION:-${AWS_DEFAULT_REGION:-}}
endpoint_url=
binary_url=
binary_sha256=
ami=
instance_type=t3.small
worker_instance_type=t3.micro
subnets=()
client_cidr=
client_port=8080
port=7101
endpoints=3
witness=0
max_workers=8
worker_idle_timeout=10m
key_name=
ssh_cidr=
state_dir=.hashq-ec2
tls=
hashq_bin=
wait_for_leader=yes
destroy=
replace=
instance_type_given=

die() { echo "deploy-ec2.sh: $*" >&2; exit 1; }
say() { echo "deploy-ec2.sh: $*" >&2; }
need() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --name) need "$@"; name=$2; shift 2 ;;
    --region) need "$@"; region=$2; shift 2 ;;
    --endpoint-url) need "$@"; endpoint_url=$2; shift 2 ;;
    --binary-url) need "$@"; binary_url=$2; shift 2 ;;
    --binary-sha256) need "$@"; binary_sha256=$2; shift 2 ;;
    --ami) need "$@"; ami=$2; shift 2 ;;
    --instance-type) need "$@"; instance_type=$2; instance_type_given=yes; shift 2 ;;
    --worker-instance-type) need "$@"; worker_instance_type=$2; shift 2 ;;
    --subnet) need "$@"; subnets+=("$2"); shift 2 ;;
    --client-cidr) need "$@"; client_cidr=$2; shift 2 ;;
    --client-port) need "$@"; client_port=$2; shift 2 ;;
    --port) need "$@"; port=$2; shift 2 ;;
    --endpoints) need "$@"; endpoints=$2; shift 2 ;;
    --witness) need "$@"; witness=$2; shift 2 ;;
    --max-workers) need "$@"; max_workers=$2; shift 2 ;;
    --worker-idle-timeout) need "$@"; worker_idle_timeout=$2; shift 2 ;;
    --key-name) need "$@"; key_name=$2; shift 2 ;;
    --ssh-cidr) need "$@"; ssh_cidr=$2; shift 2 ;;
    --state-dir) need "$@"; state_dir=$2; shift 2 ;;
    --tls) tls=yes; shift ;;
    --hashq) need "$@"; hashq_bin=$2; shift 2 ;;
    --no-wait) wait_for_leader=; shift ;;
    --destroy) destroy=yes; shift ;;
    --replace-endpoint) need "$@"; replace=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

command -v aws >/dev/null || die "the AWS CLI is not installed (pip install awscli)"
[[ $name =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$ ]] || die "--name: 1-40 letters, digits, '.', '_' or '-'"
if [[ -z $region ]]; then
  region=$(aws configure get region 2>/dev/null || true)
fi
[[ -n $region ]] || die "no region: pass --region (or set AWS_REGION)"

api=(--region "$region")
[[ -n $endpoint_url ]] && api+=(--endpoint-url "$endpoint_url")
# One AWS CLI call, text output; "None" (nothing found) becomes empty.
awsq() {
  local out
  out=$(aws "${api[@]}" --output text "$@") || return 1
  [[ $out == None ]] && out=
  printf '%s' "$out"
}

# One credential per audience: peer (nodes only), worker (workers' user data), admin (the
# operator's `hashq cluster` commands). Only the admin one is useful outside the cluster.
token_file="$state_dir/$name.token"
worker_token_file="$state_dir/$name.worker-token"
admin_token_file="$state_dir/$name.admin-token"
tls_dir="$state_dir/$name.tls"
tag_filter=(Name=tag:hashq:cluster,Values="$name")

# ---------------------------------------------------------------------------------- destroy
instances_in() { # states... -> instance ids of this cluster in those states
  local states
  states=$(IFS=,; echo "$*")
  awsq ec2 describe-instances --filters "${tag_filter[@]}" "Name=instance-state-name,Values=$states" \
    --query 'Reservations[].Instances[].InstanceId' | tr '\t' '\n' | sed '/^$/d'
}

terminate_all() {
  local deadline=$((SECONDS + 900)) ids
  while :; do
    ids=$(instances_in pending running stopping stopped)
    if [[ -n $ids ]]; then
      # shellcheck disable=SC2086 # one id per word
      awsq ec2 terminate-instances --instance-ids $ids --query 'TerminatingInstances[].InstanceId' >/dev/null
      say "terminating $(echo $ids | wc -w) instance(s)"
    fi
    # Endpoints may launch a worker until they are gone: look again until nothing is left.
    if [[ -z $ids && -z $(instances_in shutting-down) ]]; then
      return 0
    fi
    ((SECONDS < deadline)) || die "instances still not terminated after 15 minutes"
    sleep 3
  done
}

delete_groups() {
  local deadline=$((SECONDS + 600)) groups group left
  while :; do
    groups=$(awsq ec2 describe-security-groups --filters "${tag_filter[@]}" --query 'SecurityGroups[].GroupId' | tr '\t' '\n' | sed '/^$/d')
    [[ -z $groups ]] && return 0
    left=
    for group in $groups; do
      # A group stays in use while the network interfaces of terminated instances detach.
      if awsq ec2 delete-security-group --group-id "$group" >/dev/null 2>&1; then
        say "deleted security group $group"
      else
        left=yes
      fi
    done
    [[ -z $left ]] && return 0
    ((SECONDS < deadline)) || die "security groups still in use after 10 minutes: $groups"
    sleep 5
  done
}

delete_iam() {
  # Found by path (and the path is matched exactly: some emulators ignore --path-prefix).
  local path="/hashq/$name/" profile role policy
  while read -r profile role; do
    [[ -n $profile ]] || continue
    if [[ -n $role ]]; then
      awsq iam remove-role-from-instance-profile --instance-profile-name "$profile" --role-name "$role" >/dev/null
    fi
    awsq iam delete-instance-profile --instance-profile-name "$profile" >/dev/null
    say "deleted instance profile $profile"
  done <<<"$(awsq iam list-instance-profiles --path-prefix "$path" \
    --query "InstanceProfiles[?Path=='$path'].[InstanceProfileName, Roles[0].RoleName]" | sed 's/\tNone$//')"
  for role in $(awsq iam list-roles --path-prefix "$path" --query "Roles[?Path=='$path'].RoleName" | tr '\t' '\n'); do
    for policy in $(awsq iam list-role-policies --role-name "$role" --query 'PolicyNames[]' | tr '\t' '\n'); do
      awsq iam delete-role-policy --role-name "$role" --policy-name "$policy" >/dev/null
    done
    awsq iam delete-role --role-name "$role" >/dev/null
    say "deleted role $role"
  done
}

if [[ -n $destroy ]]; then
  say "destroying cluster $name in $region"
  terminate_all
  delete_groups
  delete_iam
  rm -f "$token_file" "$worker_token_file" "$admin_token_file"
  rm -rf "$tls_dir"
  say "cluster $name is gone"
  exit 0
fi

check_binary_flags() {
  [[ -n $binary_url ]] || die "--binary-url is required: where the instances download hashq"
  [[ $binary_url =~ ^https?://[^[:space:]\']+$ ]] || die "--binary-url must be an http(s) URL"
  [[ -z $binary_sha256 || $binary_sha256 =~ ^[0-9a-fA-F]{64}$ ]] || die "--binary-sha256 must be 64 hex digits"
}

# The local hashq that issues TLS certificates.
find_hashq() {
  local root candidate
  root=$(cd "$(dirname "$0")/.." && pwd)
  if [[ -z $hashq_bin ]]; then
    for candidate in "$(command -v hashq || true)" "$root/target/release/hashq" "$root/target/debug/hashq"; do
      [[ -n $candidate && -x $candidate ]] && { hashq_bin=$candidate; break; }
    done
  fi
  [[ -n $hashq_bin && -x $hashq_bin ]] || die "--tls needs a local hashq to issue certificates (--hashq BIN)"
}

# ---------------------------------------------------------------------------------- helpers
# Private addresses: fixed, so the peers list is known before anything boots.
ip_to_int() { local IFS=.; read -r a b c d <<<"$1"; echo $(((a << 24) + (b << 16) + (c << 8) + d)); }
int_to_ip() { echo "$((($1 >> 24) & 255)).$((($1 >> 16) & 255)).$((($1 >> 8) & 255)).$(($1 & 255))"; }
addresses_in_use() { # vpc -> " ip ip ... " (once; pick_ip adds what it picks)
  echo " $(awsq ec2 describe-network-interfaces --filters "Name=vpc-id,Values=$1" \
    --query 'NetworkInterfaces[].PrivateIpAddresses[].PrivateIpAddress' | tr '\t\n' '  ') "
}
declare -A cidr_of=()
used=
picked=
pick_ip() { # subnet -> $picked, a free private address in it (then marked used)
  local subnet=$1 cidr=${cidr_of[$1]} base size offset ip
  base=$(ip_to_int "${cidr%/*}")
  size=$((1 << (32 - ${cidr#*/})))
  # AWS reserves the first four addresses and the last one of every subnet.
  for ((offset = 10; offset < size - 1; offset++)); do
    ip=$(int_to_ip $((base + offset)))
    if [[ $used != *" $ip "* ]]; then
      used+="$ip "
      picked=$ip
      return 0
    fi
  done
  die "no free address in $subnet ($cidr)"
}

# A node's TLS files, written where the service user can read them, and their variables.
tls_user_data() { # id -> shell lines
  local id=$1 file
  [[ -n $tls ]] || return 0
  echo 'install -d -o root -g hashq -m 0750 /etc/hashq-tls'
  for file in ca node node-key; do
    local src="$tls_dir/$file.pem"
    [[ $file == node ]] && src="$tls_dir/node-$id.pem"
    [[ $file == node-key ]] && src="$tls_dir/node-$id-key.pem"
    printf "cat > /etc/hashq-tls/%s.pem <<'HASHQ_PEM'\n%s\nHASHQ_PEM\n" "$file" "$(cat "$src")"
  done
  echo 'chgrp hashq /etc/hashq-tls/*.pem && chmod 0640 /etc/hashq-tls/*.pem'
}

# The user data of a node: ID ROLE SUBNET; $membership_env says how it finds the cluster
# (HASHQ_PEERS=... for a founder, HASHQ_JOIN=URL for a newcomer), $after_start is shell run
# once its service is started.
node_user_data() {
  local id=$1 role=$2 subnet=$3
  cat <<EOF
#!/bin/bash
# hashq node $id ($role) of cluster $name, written by scripts/deploy-ec2.sh.
# Installs hashq from the operator's URL and runs \`hashq node\` as a systemd service. No AWS
# key is here: the node uses its instance profile.
set -euo pipefail
umask 077
install -d -m 0700 /etc/hashq
cat > /etc/hashq/node.env <<'HASHQ_ENV'
HASHQ_ID=$id
HASHQ_ROLE=$role
HASHQ_LISTEN=0.0.0.0:$port$([[ $role == endpoint ]] && printf '\nHASHQ_CLIENT_LISTEN=0.0.0.0:%s' "$client_port")
$membership_env
HASHQ_DATA_DIR=/var/lib/hashq
HASHQ_CLUSTER_NAME=$name
HASHQ_CLUSTER_TOKEN=$token
HASHQ_WORKER_TOKEN=$worker_token
HASHQ_ADMIN_TOKEN=$admin_token
HASHQ_LAUNCHER=ec2
HASHQ_MAX_WORKERS=$max_workers
HASHQ_WORKER_IDLE_TIMEOUT=$worker_idle_timeout
HASHQ_EC2_REGION=$region
HASHQ_EC2_AMI=$ami
HASHQ_EC2_INSTANCE_TYPE=$worker_instance_type
HASHQ_EC2_SUBNET=$subnet
HASHQ_EC2_SECURITY_GROUP=$cluster_sg
HASHQ_EC2_INSTANCE_PROFILE=hashq-$name-worker$([[ -n $endpoint_url ]] && printf '\nHASHQ_EC2_ENDPOINT_URL=%s' "$endpoint_url")
HASHQ_LOG_FORMAT=json$([[ -n $tls ]] && printf '\nHASHQ_TLS_CERT=/etc/hashq-tls/node.pem\nHASHQ_TLS_KEY=/etc/hashq-tls/node-key.pem\nHASHQ_TLS_CA=/etc/hashq-tls/ca.pem')
HASHQ_ENV

curl -fsSL --retry 10 --retry-delay 3 --retry-all-errors -o /usr/local/bin/hashq.part '$binary_url'$([[ -n $binary_sha256 ]] && printf "\necho '%s  /usr/local/bin/hashq.part' | sha256sum -c -" "$binary_sha256")
chmod 0755 /usr/local/bin/hashq.part
mv /usr/local/bin/hashq.part /usr/local/bin/hashq

id hashq >/dev/null 2>&1 || useradd --system --home-dir /var/lib/hashq --shell /sbin/nologin hashq
install -d -o hashq -g hashq -m 0700 /var/lib/hashq
$(tls_user_data "$id")
cat > /etc/systemd/system/hashq-node.service <<'HASHQ_UNIT'
[Unit]
Description=hashq node $id of cluster $name
Wants=network-online.target
After=network-online.target

[Service]
User=hashq
EnvironmentFile=/etc/hashq/node.env
ExecStart=/usr/local/bin/hashq node
Restart=always
RestartSec=2
LimitNOFILE=65536
ProtectSystem=strict
ReadWritePaths=/var/lib/hashq
ProtectHome=yes
PrivateTmp=yes
NoNewPrivileges=yes

[Install]
WantedBy=multi-user.target
HASHQ_UNIT
systemctl daemon-reload
systemctl enable --now hashq-node.service
$after_start
EOF
}

# Launches node ID (ROLE) at IP in SUBNET with the user data in $user_data_file: its
# instance id in $instance.
instance=
launch_node() {
  local id=$1 role=$2 ip=$3 subnet=$4 attempt tags groups=("$cluster_sg") extra=()
  [[ $role == endpoint ]] && groups+=("$client_sg")
  tags="[{Key=Name,Value=hashq-$name-$id},{Key=hashq:cluster,Value=$name},{Key=hashq:role,Value=$role},{Key=hashq:node-id,Value=$id}]"
  [[ -n $key_name ]] && extra+=(--key-name "$key_name")
  # A new instance profile takes a few seconds to be usable by EC2: retry while it is not.
  for attempt in 1 2 3 4 5 6 7 8 9 10; do
    if instance=$(awsq ec2 run-instances --image-id "$ami" --instance-type "$instance_type" --count 1 \
      --subnet-id "$subnet" --private-ip-address "$ip" \
      --security-group-ids "${groups[@]}" --iam-instance-profile "Name=hashq-$name-node" \
      --metadata-options HttpTokens=required,HttpEndpoint=enabled \
      --user-data "file://$user_data_file" \
      --tag-specifications "ResourceType=instance,Tags=$tags" "ResourceType=volume,Tags=$tags" \
      "${extra[@]}" --query 'Instances[0].InstanceId' 2>"$user_data_file.err"); then
      break
    fi
    if ((attempt == 10)) || ! grep -qi 'instance profile\|iamInstanceProfile' "$user_data_file.err"; then
      cat "$user_data_file.err" >&2
      exit 1
    fi
    sleep 5
  done
  say "node $id ($role): $instance at $ip in $subnet"
}

leader_elected() {
  local url
  for url in "${urls[@]}"; do
    if curl "${curl_args[@]}" -fsS --max-time 3 "$url/health" 2>/dev/null | grep -q '"leader":[0-9]'; then
      return 0
    fi
  done
  return 1
}

wait_for_leader_at() { # urls... (with $curl_args)
  urls=("$@")
  say "waiting for the cluster to elect a leader (instances boot and download hashq first)"
  local deadline=$((SECONDS + 900))
  until leader_elected; do
    ((SECONDS < deadline)) || die "no leader after 15 minutes; see /var/log/cloud-init-output.log on the instances"
    sleep 5
  done
}

# ------------------------------------------------------------------------ replace-endpoint
if [[ -n $replace ]]; then
  [[ $replace =~ ^[0-9]+$ ]] || die "--replace-endpoint takes a node id"
  check_binary_flags
  for file in "$token_file" "$worker_token_file" "$admin_token_file"; do
    [[ -s $file ]] || die "$file is missing: the credentials stay in the --state-dir the cluster was deployed with"
  done
  token=$(<"$token_file") worker_token=$(<"$worker_token_file") admin_token=$(<"$admin_token_file")
  # A cluster deployed with --tls keeps its CA here: the new node gets a certificate of it.
  [[ -e $tls_dir/ca.pem ]] && tls=yes
  [[ -z $tls || -e $tls_dir/ca.pem ]] || die "--tls, but cluster $name has no CA in $tls_dir"
  [[ -n $tls ]] && find_hashq

  # The cluster's nodes, in any state (a terminated one still shows for a while).
  old_instance= old_subnet= old_role= via= via_ip= via_role= max_id=0
  survivor_ami= survivor_type= survivor_subnet=
  while IFS=$'\t' read -r id role state inst ip subnet image type; do
    [[ $id =~ ^[0-9]+$ ]] || continue
    ((id > max_id)) && max_id=$id
    live=
    [[ $state == pending || $state == running ]] && live=yes
    if [[ $id == "$replace" ]]; then
      old_role=$role
      [[ $subnet != None ]] && old_subnet=$subnet
      [[ -n $live ]] && old_instance=$inst
    elif [[ -n $live ]]; then
      # Join through a surviving endpoint (a witness will do if none is left).
      if [[ -z $via || ($role == endpoint && $via_role != endpoint) ]]; then
        via=$id via_ip=$ip via_role=$role
      fi
      survivor_ami=$image survivor_type=$type survivor_subnet=$subnet
    fi
  done <<<"$(awsq ec2 describe-instances --filters "${tag_filter[@]}" Name=tag:hashq:role,Values=endpoint,witness \
    --query 'Reservations[].Instances[].[Tags[?Key==`hashq:node-id`]|[0].Value, Tags[?Key==`hashq:role`]|[0].Value, State.Name, InstanceId, PrivateIpAddress, SubnetId, ImageId, InstanceType]')"
  [[ -n $old_role ]] || die "cluster $name has no node $replace"
  [[ $old_role == endpoint ]] || die "node $replace is a $old_role, not an endpoint"
  [[ -n $via ]] || die "no node of cluster $name is left running to join: a lost majority is recovered offline (README, \"Changing the membership\")"
  # Node ids are never reused, even once a terminated instance no longer shows.
  last_id_file="$state_dir/$name.last-id"
  if [[ -s $last_id_file ]] && (($(<"$last_id_file") > max_id)); then max_id=$(<"$last_id_file"); fi
  new_id=$((max_id + 1))
  [[ -n $ami ]] || ami=$survivor_ami
  [[ -n $instance_type_given ]] || instance_type=$survivor_type
  subnet=${old_subnet:-$survivor_subnet}
  cluster_sg=$(awsq ec2 describe-security-groups --filters "${tag_filter[@]}" Name=tag:hashq:role,Values=cluster --query 'SecurityGroups[0].GroupId')
  client_sg=$(awsq ec2 describe-security-groups --filters "${tag_filter[@]}" Name=tag:hashq:role,Values=client --query 'SecurityGroups[0].GroupId')
  [[ -n $cluster_sg && -n $client_sg ]] || die "cluster $name's security groups are gone"
  read -r vpc cidr <<<"$(awsq ec2 describe-subnets --subnet-ids "$subnet" --query 'Subnets[0].[VpcId,CidrBlock]')"
  cidr_of[$subnet]=$cidr
  used=$(addresses_in_use "$vpc")
  pick_ip "$subnet"
  new_ip=$picked

  umask 077
  printf '%s\n' "$new_id" >"$last_id_file"
  scheme=http ca_flag=
  if [[ -n $tls ]]; then
    scheme=https ca_flag=' --tls-ca /etc/hashq-tls/ca.pem'
    "$hashq_bin" tls --dir "$tls_dir" --name "node-$new_id" --host "$new_ip" \
      --host "node-$new_id.$name.hashq" >/dev/null || die "cannot issue node $new_id's certificate"
  fi
  join_url="$scheme://$via_ip:$port"
  membership_env="HASHQ_JOIN=$join_url
HASHQ_ADVERTISE=$new_ip:$port"
  # The cluster port is open to members only: the new node swaps itself in, from inside.
  after_start=$(cat <<EOF

# Swap node $replace for this one (a learner first, promoted once caught up), until done.
set -a; . /etc/hashq/node.env; set +a
for attempt in \$(seq 1 120); do
  if /usr/local/bin/hashq cluster --endpoints $join_url$ca_flag replace $replace --id $new_id --addr $new_ip:$port; then
    break
  fi
  sleep 5
done
EOF
  )
  if [[ -n $old_instance ]]; then
    awsq ec2 terminate-instances --instance-ids "$old_instance" --query 'TerminatingInstances[].InstanceId' >/dev/null
    say "node $replace: terminated $old_instance"
  fi
  user_data_file=$(mktemp)
  trap 'rm -f "$user_data_file" "$user_data_file.err"' EXIT
  node_user_data "$new_id" endpoint "$subnet" >"$user_data_file"
  launch_node "$new_id" endpoint "$new_ip" "$subnet"
  address=$(awsq ec2 describe-instances --instance-ids "$instance" --query 'Reservations[0].Instances[0].PublicIpAddress')
  address=${address:-$new_ip}
  curl_args=()
  if [[ -n $tls ]]; then
    host="node-$new_id.$name.hashq"
    url="https://$host:$client_port"
    curl_args=(--resolve "$host:$client_port:$address" --cacert "$tls_dir/ca.pem")
  else
    url="http://$address:$client_port"
  fi
  if [[ -n $wait_for_leader ]]; then wait_for_leader_at "$url"; fi
  echo "node $replace of cluster $name is replaced by node $new_id ($instance at $new_ip), joining through node $via: $url"
  exit 0
fi

# ----------------------------------------------------------------------------------- deploy
check_binary_flags
[[ -n $client_cidr ]] || die "--client-cidr is required: who may use the client API (e.g. 203.0.113.7/32)"
[[ $client_cidr =~ ^[0-9.]+/[0-9]+$ ]] || die "--client-cidr must be an IPv4 CIDR"
[[ -z $ssh_cidr || $ssh_cidr =~ ^[0-9.]+/[0-9]+$ ]] || die "--ssh-cidr must be an IPv4 CIDR"
[[ $endpoints =~ ^[0-9]+$ && $endpoints -ge 1 ]] || die "--endpoints must be at least 1"
[[ $witness =~ ^[01]$ ]] || die "--witness must be 0 or 1"
[[ $max_workers =~ ^[0-9]+$ ]] || die "--max-workers must be a whole number"
[[ $port =~ ^[0-9]+$ && $client_port =~ ^[0-9]+$ && $port != "$client_port" ]] || die "--port and --client-port must be two different ports"
voters=$((endpoints + witness))
if [[ -n $tls ]]; then
  find_hashq
  [[ -e $tls_dir/ca.pem ]] && die "$tls_dir exists (an earlier cluster $name?); remove it first"
fi
((voters % 2 == 1)) || say "warning: $voters voters; an odd number tolerates as many failures with one machine less"

if [[ -n $(instances_in pending running stopping stopped) ]] ||
  [[ -n $(awsq ec2 describe-security-groups --filters "${tag_filter[@]}" --query 'SecurityGroups[].GroupId') ]]; then
  die "cluster $name already exists; remove it first with --destroy --name $name"
fi

# Whatever stops the deploy half-way, say how to remove what it created.
deployed=
user_data_file=$(mktemp)
on_exit() {
  rm -f "$user_data_file" "$user_data_file.err"
  if [[ -z $deployed ]]; then
    say "deploy failed; what it created is tagged hashq:cluster=$name. Remove it with:"
    say "  $0 --destroy --name $name --region $region${endpoint_url:+ --endpoint-url $endpoint_url}"
  fi
}
trap on_exit EXIT

# Subnets: as given, else the default VPC's (one per availability zone), with their VPC and
# address range, in one call.
if [[ ${#subnets[@]} -eq 0 ]]; then
  subnet_query=(--filters Name=default-for-az,Values=true)
else
  subnet_query=(--subnet-ids "${subnets[@]}")
fi
vpc=
found_subnets=()
while read -r subnet subnet_vpc cidr; do
  [[ -n $subnet ]] || continue
  cidr_of[$subnet]=$cidr
  [[ -z $vpc || $vpc == "$subnet_vpc" ]] || die "the subnets must share one VPC"
  vpc=$subnet_vpc
  found_subnets+=("$subnet")
done <<<"$(awsq ec2 describe-subnets "${subnet_query[@]}" \
  --query 'sort_by(Subnets,&AvailabilityZone)[].[SubnetId,VpcId,CidrBlock]')"
[[ -n $vpc ]] || die "no subnet found: pass --subnet (there is no default VPC here)"
[[ ${#subnets[@]} -gt 0 ]] || subnets=("${found_subnets[@]}")
for subnet in "${subnets[@]}"; do
  [[ -n ${cidr_of[$subnet]:-} ]] || die "subnet $subnet not found"
done

if [[ -z $ami ]]; then
  ami=$(awsq ec2 describe-images --owners amazon \
    --filters 'Name=name,Values=al2023-ami-2023.*-x86_64' Name=state,Values=available \
    --query 'sort_by(Images,&CreationDate)[-1].ImageId')
  [[ -n $ami ]] || die "no Amazon Linux 2023 image found: pass --ami"
fi

# --- security groups
group_tags() { echo "ResourceType=security-group,Tags=[{Key=Name,Value=hashq-$name-$1},{Key=hashq:cluster,Value=$name},{Key=hashq:role,Value=$1}]"; }
cluster_sg=$(awsq ec2 create-security-group --group-name "hashq-$name-cluster" --vpc-id "$vpc" \
  --description "hashq $name: cluster port, members only" --tag-specifications "$(group_tags cluster)" --query GroupId)
awsq ec2 authorize-security-group-ingress --group-id "$cluster_sg" \
  --ip-permissions "IpProtocol=tcp,FromPort=$port,ToPort=$port,UserIdGroupPairs=[{GroupId=$cluster_sg}]" >/dev/null
client_sg=$(awsq ec2 create-security-group --group-name "hashq-$name-client" --vpc-id "$vpc" \
  --description "hashq $name: client API" --tag-specifications "$(group_tags client)" --query GroupId)
awsq ec2 authorize-security-group-ingress --group-id "$client_sg" --protocol tcp --port "$client_port" --cidr "$client_cidr" >/dev/null
if [[ -n $ssh_cidr ]]; then
  awsq ec2 authorize-security-group-ingress --group-id "$cluster_sg" --protocol tcp --port 22 --cidr "$ssh_cidr" >/dev/null
fi
say "security groups: cluster $cluster_sg, client $client_sg"

# --- IAM: roles, least-privilege policies, instance profiles
trust='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}'
iam_path="/hashq/$name/"
iam_tags=(Key=hashq:cluster,Value="$name")
make_role() { # role -> its ARN
  awsq iam create-role --role-name "hashq-$name-$1" --path "$iam_path" --assume-role-policy-document "$trust" \
    --description "hashq $name $1 instances" --tags "${iam_tags[@]}" --query Role.Arn
}
node_role_arn=$(make_role node)
worker_role_arn=$(make_role worker)

subnet_arns=
for s in "${subnets[@]}"; do subnet_arns+="\"arn:aws:ec2:$region:*:subnet/$s\","; done
node_policy=$(cat <<EOF
{"Version":"2012-10-17","Statement":[
 {"Sid":"LaunchTaggedWorkers","Effect":"Allow","Action":"ec2:RunInstances",
  "Resource":"arn:aws:ec2:$region:*:instance/*",
  "Condition":{"StringEquals":{"aws:RequestTag/hashq:cluster":"$name","aws:RequestTag/hashq:role":"worker"}}},
 {"Sid":"LaunchWithTheseResources","Effect":"Allow","Action":"ec2:RunInstances",
  "Resource":[$subnet_arns"arn:aws:ec2:$region:*:security-group/$cluster_sg","arn:aws:ec2:$region::image/$ami",
   "arn:aws:ec2:$region:*:volume/*","arn:aws:ec2:$region:*:network-interface/*"]},
 {"Sid":"TagOnlyAtLaunch","Effect":"Allow","Action":"ec2:CreateTags",
  "Resource":["arn:aws:ec2:$region:*:instance/*","arn:aws:ec2:$region:*:volume/*"],
  "Condition":{"StringEquals":{"ec2:CreateAction":"RunInstances"}}},
 {"Sid":"TerminateOwnWorkers","Effect":"Allow","Action":"ec2:TerminateInstances",
  "Resource":"arn:aws:ec2:$region:*:instance/*",
  "Condition":{"StringEquals":{"aws:ResourceTag/hashq:cluster":"$name","aws:ResourceTag/hashq:role":"worker"}}},
 {"Sid":"Describe","Effect":"Allow","Action":["ec2:DescribeInstances","ec2:DescribeInstanceStatus"],"Resource":"*"},
 {"Sid":"PassTheWorkerRole","Effect":"Allow","Action":"iam:PassRole","Resource":"$worker_role_arn",
  "Condition":{"StringEquals":{"iam:PassedToService":"ec2.amazonaws.com"}}}
]}
EOF
)
worker_policy='{"Version":"2012-10-17","Statement":[{"Sid":"ParentCheck","Effect":"Allow","Action":["ec2:DescribeInstanceStatus","ec2:DescribeInstances"],"Resource":"*"}]}'
awsq iam put-role-policy --role-name "hashq-$name-node" --policy-name hashq-node --policy-document "$node_policy" >/dev/null
awsq iam put-role-policy --role-name "hashq-$name-worker" --policy-name hashq-worker --policy-document "$worker_policy" >/dev/null
for kind in node worker; do
  awsq iam create-instance-profile --instance-profile-name "hashq-$name-$kind" --path "$iam_path" --tags "${iam_tags[@]}" >/dev/null
  awsq iam add-role-to-instance-profile --instance-profile-name "hashq-$name-$kind" --role-name "hashq-$name-$kind" >/dev/null
done
say "roles: $node_role_arn, $worker_role_arn"

# --- private addresses: fixed, so the peers list is known before anything boots
used=$(addresses_in_use "$vpc")

ids=() roles=() node_subnets=() ips=()
for ((i = 1; i <= voters; i++)); do
  ids+=("$i")
  if ((i <= endpoints)); then roles+=(endpoint); else roles+=(witness); fi
  subnet=${subnets[$(((i - 1) % ${#subnets[@]}))]}
  node_subnets+=("$subnet")
  pick_ip "$subnet"
  ips+=("$picked")
done
peers=
for ((k = 0; k < voters; k++)); do peers+="${peers:+,}${ids[$k]}=${ips[$k]}:$port"; done

umask 077
mkdir -p "$state_dir"
new_token() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }
token=$(new_token)
worker_token=$(new_token)
admin_token=$(new_token)
printf '%s\n' "$token" >"$token_file"
printf '%s\n' "$worker_token" >"$worker_token_file"
printf '%s\n' "$admin_token" >"$admin_token_file"
if [[ -n $tls ]]; then
  for ((k = 0; k < voters; k++)); do
    "$hashq_bin" tls --dir "$tls_dir" --name "node-${ids[$k]}" --host "${ips[$k]}" \
      --host "node-${ids[$k]}.$name.hashq" >/dev/null || die "cannot issue node ${ids[$k]}'s certificate"
  done
  say "cluster CA: $tls_dir/ca.pem (its key, ca-key.pem, issues node certificates: keep it safe)"
fi



launched=()
membership_env="HASHQ_PEERS=$peers"
after_start=
for ((k = 0; k < voters; k++)); do
  node_user_data "${ids[$k]}" "${roles[$k]}" "${node_subnets[$k]}" >"$user_data_file"
  launch_node "${ids[$k]}" "${roles[$k]}" "${ips[$k]}" "${node_subnets[$k]}"
  launched+=("$instance")
done
deployed=yes

# --- the endpoint URLs: public addresses where the subnet gives them, else private ones
declare -A public_of=()
while read -r instance address; do
  [[ -n $instance ]] && public_of[$instance]=$address
done <<<"$(awsq ec2 describe-instances --instance-ids "${launched[@]}" \
  --query 'Reservations[].Instances[].[InstanceId,PublicIpAddress]' | sed 's/\tNone$//')"
urls=() shown=() curl_args=()
for ((k = 0; k < voters; k++)); do
  [[ ${roles[$k]} == endpoint ]] || continue
  address=${public_of[${launched[$k]}]:-${ips[$k]}}
  if [[ -n $tls ]]; then
    # The certificate names the node, not its public address (unknown before launch).
    host="node-${ids[$k]}.$name.hashq"
    urls+=("https://$host:$client_port")
    shown+=("https://$host:$client_port  (at $address: map the name to it in DNS or /etc/hosts)")
    curl_args+=(--resolve "$host:$client_port:$address")
  else
    urls+=("http://$address:$client_port")
    shown+=("http://$address:$client_port")
  fi
done
if [[ -n $tls ]]; then curl_args+=(--cacert "$tls_dir/ca.pem"); fi

if [[ -n $wait_for_leader ]]; then
  wait_for_leader_at "${urls[@]}"
fi

echo "hashq cluster $name in $region (admin token in $admin_token_file):"
printf '  %s\n' "${shown[@]}"
if [[ -n $tls ]]; then echo "cluster CA (hashq ... --tls-ca): $tls_dir/ca.pem"; fi
