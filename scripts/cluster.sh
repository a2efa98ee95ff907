#!/usr/bin/env bash
# A local hashq cluster on loopback, for trying it out and for scripts.
#
#   scripts/cluster.sh up [N] [--tls]
#                                 build (release), start N nodes (default 3) on 127.0.0.1:7101..,
#                                 wait for a leader, print the endpoint URLs; --tls (first up
#                                 only) creates a cluster CA and node certificates in
#                                 .cluster/tls and runs every link over TLS
#   scripts/cluster.sh down       stop every node and worker (data is kept in .cluster/)
#   scripts/cluster.sh reset      down, then delete .cluster/
#   scripts/cluster.sh status     each node's process and Raft state
#   scripts/cluster.sh kill ID    SIGKILL node ID
#   scripts/cluster.sh start ID   start node ID again (with its data)
#   scripts/cluster.sh logs ID    print node ID's log (LINES=200 by default)
#   scripts/cluster.sh add        start one more node (--join) and add it to the membership
#   scripts/cluster.sh remove ID  remove node ID from the membership, then stop it
#   scripts/cluster.sh rolling-restart [--bin NEW]
#                                 restart the nodes one at a time, followers first, each once
#                                 the others lead and it caught up; --bin upgrades to NEW
#
# Workers are launched by the nodes themselves (`--launcher local`) when work waits, within
# the cluster-wide budget (HASHQ_MAX_WORKERS, default 4), and exit when idle.
#
# Environment: HASHQ_BASE_PORT (7101), HASHQ_BIN (skip the build and use this binary),
# HASHQ_MAX_WORKERS (4), HASHQ_NODE_ARGS (extra `hashq node` flags), HASHQ_CLUSTER_DIR
# (.cluster in the repository).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir=${HASHQ_CLUSTER_DIR:-$root/.cluster}
base_port=${HASHQ_BASE_PORT:-7101}
# A rolling upgrade records the binary it moved to: later starts use it too.
bin=${HASHQ_BIN:-$(cat "$dir/bin" 2>/dev/null || echo "$root/target/release/hashq")}

die() { echo "cluster.sh: $*" >&2; exit 1; }
port_of() { echo $((base_port + $1 - 1)); }
size() { cat "$dir/size" 2>/dev/null || echo 3; }
# Nodes added after the cluster formed: they start with --join, not --peers.
joined() { grep -qx "$1" "$dir/joined" 2>/dev/null; }
removed() { grep -qx "$1" "$dir/removed" 2>/dev/null; }
token() { cat "$dir/$1-token"; }
# A cluster made with `up --tls` keeps its CA in $dir/tls (created with the first node's
# certificate) and speaks https only.
tls() { [[ -d $dir/tls ]]; }
scheme() { if tls; then echo https; else echo http; fi; }
url_of() { echo "$(scheme)://127.0.0.1:$(port_of "$1")"; }
# curl that trusts the cluster CA (and nothing else) in a TLS cluster.
hq_curl() { if tls; then curl --cacert "$dir/tls/ca.pem" "$@"; else curl "$@"; fi; }

peers() {
  local n=$1 out="" i
  for ((i = 1; i <= n; i++)); do out+="${out:+,}$i=127.0.0.1:$(port_of "$i")"; done
  echo "$out"
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_node() {
  local id=$1 n
  n=$(size)
  alive "$dir/node-$id.pid" && { echo "node $id is already running"; return; }
  removed "$id" && die "node $id was removed from the cluster"
  mkdir -p "$dir/$id"
  local members=(--peers "$(peers "$(cat "$dir/founders" 2>/dev/null || echo "$n")")")
  joined "$id" && members=(--join "$(url_of "$(any_member "$id")")")
  local tls_env=()
  if tls; then
    "$bin" tls --dir "$dir/tls" --name "node-$id" --host 127.0.0.1 --host localhost >/dev/null ||
      die "cannot issue node $id's certificate"
    tls_env=(HASHQ_TLS_CERT="$dir/tls/node-$id.pem" HASHQ_TLS_KEY="$dir/tls/node-$id-key.pem" HASHQ_TLS_CA="$dir/tls/ca.pem")
  fi
  # shellcheck disable=SC2086
  env "${tls_env[@]}" HASHQ_CLUSTER_TOKEN="$(token peer)" HASHQ_WORKER_TOKEN="$(token worker)" HASHQ_ADMIN_TOKEN="$(token admin)" \
  nohup "$bin" node --id "$id" --listen "127.0.0.1:$(port_of "$id")" "${members[@]}" \
    --data-dir "$dir/$id" --launcher local \
    --max-workers "${HASHQ_MAX_WORKERS:-4}" ${HASHQ_NODE_ARGS:-} \
    >>"$dir/node-$id.log" 2>&1 &
  echo $! >"$dir/node-$id.pid"
}

# A running member other than $1, for --join and the CLI.
any_member() {
  local i
  for ((i = 1; i <= $(size); i++)); do
    [[ $i != "$1" ]] && ! removed "$i" && alive "$dir/node-$i.pid" && { echo "$i"; return; }
  done
  echo 1
}

admin_cli() {
  local ca=()
  tls && ca=(--tls-ca "$dir/tls/ca.pem")
  HASHQ_ADMIN_TOKEN=$(token admin) "$bin" cluster --endpoints "$(url_of "$(any_member 0)")" \
    --timeout 150s "${ca[@]}" "$@"
}

leader_of() {
  hq_curl -fsS --max-time 1 "$(url_of "$1")/health" 2>/dev/null |
    sed -n 's/.*"leader":\([0-9][0-9]*\).*/\1/p'
}

wait_for_leader() {
  local deadline=$((SECONDS + ${1:-60})) i l
  while ((SECONDS < deadline)); do
    for ((i = 1; i <= $(size); i++)); do
      l=$(leader_of "$i")
      if [[ -n $l ]]; then echo "$l"; return 0; fi
    done
    sleep 0.2
  done
  return 1
}

stop_pidfile() {
  local f=$1 pid
  alive "$f" || { rm -f "$f"; return; }
  pid=$(cat "$f")
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$f"
}

cmd=${1:-}
case $cmd in
up)
  shift
  n=3 want_tls=
  for arg in "$@"; do
    case $arg in
    --tls) want_tls=1 ;;
    *) n=$arg ;;
    esac
  done
  [[ $n =~ ^[0-9]+$ && $n -ge 1 ]] || die "up takes a node count, got '$n'"
  command -v curl >/dev/null || die "curl is needed"
  if [[ -z ${HASHQ_BIN:-} ]]; then
    # TLS is a cargo feature (rustls, rcgen): built only for a TLS cluster, so that a plain
    # first start compiles less.
    features=()
    if [[ -n $want_tls ]] || tls; then features=(--features tls); fi
    (cd "$root" && cargo build --release --bin hashq "${features[@]}") || die "build failed"
  fi
  [[ -x $bin ]] || die "no binary at $bin"
  mkdir -p "$dir"
  if [[ -f $dir/founders && $(cat "$dir/founders") != "$n" ]]; then
    die "$dir holds a cluster founded by $(cat "$dir/founders") nodes; run 'scripts/cluster.sh reset' first"
  fi
  [[ -f $dir/founders ]] || echo "$n" >"$dir/founders"
  [[ -f $dir/size ]] || echo "$n" >"$dir/size"
  if [[ -n $want_tls ]] && ! tls; then
    [[ -f $dir/peer-token ]] && die "$dir holds a plaintext cluster; run 'scripts/cluster.sh reset' first"
    mkdir -p "$dir/tls"
  fi
  # One credential per audience (peer, worker, admin), made once per cluster; the node reads
  # them from its environment, so they never show on a command line.
  for kind in peer worker admin; do
    [[ -f $dir/$kind-token ]] || (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/$kind-token")
  done
  for ((i = 1; i <= $(size); i++)); do removed "$i" || start_node "$i"; done
  leader=$(wait_for_leader 60) || die "no leader after 60s; see scripts/cluster.sh logs 1"
  echo "hashq cluster of $n nodes is up; leader is node $leader"
  echo "endpoints: $(for ((i = 1; i <= $(size); i++)); do removed "$i" || printf '%s ' "$(url_of "$i")"; done)"
  echo "admin token (hashq cluster set-max-workers --admin-token ...): $dir/admin-token"
  if tls; then echo "cluster CA (hashq ... --tls-ca, curl --cacert): $dir/tls/ca.pem"; fi
  ;;
down)
  # Nodes stop their workers when they stop; workers of a node killed earlier are orphans.
  for f in "$dir"/node-*.pid; do [[ -e $f ]] && stop_pidfile "$f"; done
  if [[ -f $dir/size ]]; then
    ports=$(for ((i = 1; i <= $(size); i++)); do port_of "$i"; done | paste -sd'|')
    pattern="worker --endpoints https?://127\.0\.0\.1:($ports)"
    pkill -TERM -f -- "$pattern" 2>/dev/null || true
    for _ in $(seq 100); do pgrep -f -- "$pattern" >/dev/null || break; sleep 0.1; done
    pkill -KILL -f -- "$pattern" 2>/dev/null || true
  fi
  echo "stopped (data kept in $dir)"
  ;;
reset)
  "$0" down
  rm -rf "$dir"
  echo "removed $dir"
  ;;
status)
  [[ -f $dir/size ]] || die "no cluster here; run 'scripts/cluster.sh up'"
  for ((i = 1; i <= $(size); i++)); do
    if alive "$dir/node-$i.pid"; then
      s=$(hq_curl -fsS --max-time 2 "$(url_of "$i")/status" 2>/dev/null || echo '{}')
      # The node's own state is the first "state" of the document (members' follow).
      state=$(echo "$s" | grep -o '"state":"[a-z]*"' | head -n 1 | cut -d'"' -f4)
      echo "node $i: pid $(cat "$dir/node-$i.pid"), $(url_of "$i"), ${state:-not answering}, leader $(leader_of "$i")"
    else
      echo "node $i: down"
    fi
  done
  workers=$(hq_curl -fsS --max-time 2 "$(url_of 1)/metrics" 2>/dev/null |
    sed -n 's/^hashq_workers{.*state="running"} \([0-9]*\)$/\1/p')
  echo "workers running: ${workers:-unknown} (scripts/cluster.sh up launches them on demand)"
  ;;
kill)
  id=${2:-}; [[ $id =~ ^[0-9]+$ ]] || die "kill takes a node id"
  alive "$dir/node-$id.pid" || die "node $id is not running"
  kill -KILL "$(cat "$dir/node-$id.pid")"
  rm -f "$dir/node-$id.pid"
  echo "node $id killed"
  ;;
start)
  id=${2:-}; [[ $id =~ ^[0-9]+$ && $id -ge 1 && $id -le $(size) ]] || die "start takes a node id from 1 to $(size)"
  [[ -x $bin ]] || die "no binary at $bin; run 'scripts/cluster.sh up' first"
  start_node "$id"
  echo "node $id started"
  ;;
add)
  [[ -f $dir/size ]] || die "no cluster here; run 'scripts/cluster.sh up'"
  [[ -x $bin ]] || die "no binary at $bin; run 'scripts/cluster.sh up' first"
  id=$(($(size) + 1))
  echo "$id" >>"$dir/joined"
  echo "$id" >"$dir/size"
  start_node "$id"
  for _ in $(seq 100); do hq_curl -fsS --max-time 1 "$(url_of "$id")/health" >/dev/null 2>&1 && break; sleep 0.2; done
  admin_cli add --id "$id" --addr "127.0.0.1:$(port_of "$id")" >/dev/null || die "adding node $id failed; see scripts/cluster.sh logs $id"
  echo "node $id added: $(url_of "$id")"
  ;;
remove)
  id=${2:-}; [[ $id =~ ^[0-9]+$ && $id -ge 1 && $id -le $(size) ]] || die "remove takes a node id from 1 to $(size)"
  removed "$id" && die "node $id is already removed"
  admin_cli remove "$id" >/dev/null || die "removing node $id was refused (see the message above)"
  echo "$id" >>"$dir/removed"
  stop_pidfile "$dir/node-$id.pid"
  echo "node $id removed and stopped"
  ;;
rolling-restart)
  [[ -f $dir/size ]] || die "no cluster here; run 'scripts/cluster.sh up'"
  if [[ ${2:-} == --bin ]]; then
    [[ -x ${3:-} ]] || die "--bin needs an executable hashq"
    bin=$(cd "$(dirname "$3")" && pwd)/$(basename "$3")
  fi
  [[ -x $bin ]] || die "no binary at $bin"
  leader=$(wait_for_leader 60) || die "no leader to begin with"
  order=()
  for ((i = 1; i <= $(size); i++)); do
    removed "$i" || [[ $i == "$leader" ]] || order+=("$i")
  done
  order+=("$leader")
  for id in "${order[@]}"; do
    stop_pidfile "$dir/node-$id.pid"
    start_node "$id"
    # Back when it answers, follows (or is) a leader, and has applied what that leader had
    # committed when it came back.
    deadline=$((SECONDS + 120)) ok=
    while ((SECONDS < deadline)); do
      l=$(leader_of "$id" || true)
      if [[ -n $l ]]; then
        target=$(hq_curl -fsS --max-time 2 "$(url_of "$l")/status" 2>/dev/null |
          grep -o '"commit_index":[0-9]*' | head -n 1 | cut -d: -f2 || true)
        mine=$(hq_curl -fsS --max-time 2 "$(url_of "$id")/status" 2>/dev/null |
          grep -o '"commit_index":[0-9]*' | head -n 1 | cut -d: -f2 || true)
        if [[ -n $target && -n $mine ]] && ((mine >= target)); then ok=1; break; fi
      fi
      sleep 0.2
    done
    [[ -n $ok ]] || die "node $id did not rejoin and catch up within 120s; see scripts/cluster.sh logs $id"
    echo "node $id restarted ($(basename "$bin")) and caught up"
  done
  echo "$bin" >"$dir/bin"
  leader=$(wait_for_leader 60) || die "no leader after the restarts"
  echo "rolling restart done; leader is node $leader"
  ;;
logs)
  id=${2:-}; [[ $id =~ ^[0-9]+$ ]] || die "logs takes a node id"
  tail -n "${LINES:-200}" "$dir/node-$id.log"
  ;;
*)
  sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
  [[ -z $cmd ]] || exit 2
  ;;
esac
