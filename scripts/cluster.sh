#!/usr/bin/env bash
# A local hashq cluster on loopback, for trying it out and for scripts.
#
#   scripts/cluster.sh up [N]     build (release), start N nodes (default 3) on 127.0.0.1:7101..,
#                                 wait for a leader, print the endpoint URLs
#   scripts/cluster.sh down       stop every node and worker (data is kept in .cluster/)
#   scripts/cluster.sh reset      down, then delete .cluster/
#   scripts/cluster.sh status     each node's process and Raft state
#   scripts/cluster.sh kill ID    SIGKILL node ID
#   scripts/cluster.sh start ID   start node ID again (with its data)
#   scripts/cluster.sh logs ID    print node ID's log (LINES=200 by default)
#
# Workers are launched by the nodes themselves (`--launcher local`) when work waits, within
# the cluster-wide budget (HASHQ_MAX_WORKERS, default 4), and exit when idle.
#
# Environment: HASHQ_BASE_PORT (7101), HASHQ_BIN (skip the build and use this binary),
# HASHQ_MAX_WORKERS (4), HASHQ_NODE_ARGS (extra `hashq node` flags).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir="$root/.cluster"
base_port=${HASHQ_BASE_PORT:-7101}
bin=${HASHQ_BIN:-$root/target/release/hashq}

die() { echo "cluster.sh: $*" >&2; exit 1; }
port_of() { echo $((base_port + $1 - 1)); }
size() { cat "$dir/size" 2>/dev/null || echo 3; }
token() { cat "$dir/$1-token"; }

peers() {
  local n=$1 out="" i
  for ((i = 1; i <= n; i++)); do out+="${out:+,}$i=127.0.0.1:$(port_of "$i")"; done
  echo "$out"
}

endpoints() {
  local n=$1 out="" i
  for ((i = 1; i <= n; i++)); do out+="${out:+,}http://127.0.0.1:$(port_of "$i")"; done
  echo "$out"
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_node() {
  local id=$1 n
  n=$(size)
  alive "$dir/node-$id.pid" && { echo "node $id is already running"; return; }
  mkdir -p "$dir/$id"
  # shellcheck disable=SC2086
  HASHQ_CLUSTER_TOKEN=$(token peer) HASHQ_WORKER_TOKEN=$(token worker) HASHQ_ADMIN_TOKEN=$(token admin) \
  nohup "$bin" node --id "$id" --listen "127.0.0.1:$(port_of "$id")" --peers "$(peers "$n")" \
    --data-dir "$dir/$id" --launcher local \
    --max-workers "${HASHQ_MAX_WORKERS:-4}" ${HASHQ_NODE_ARGS:-} \
    >>"$dir/node-$id.log" 2>&1 &
  echo $! >"$dir/node-$id.pid"
}

leader_of() {
  curl -fsS --max-time 1 "http://127.0.0.1:$(port_of "$1")/health" 2>/dev/null |
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
  n=${2:-3}
  [[ $n =~ ^[0-9]+$ && $n -ge 1 ]] || die "up takes a node count, got '$n'"
  command -v curl >/dev/null || die "curl is needed"
  if [[ -z ${HASHQ_BIN:-} ]]; then
    (cd "$root" && cargo build --release --bin hashq) || die "build failed"
  fi
  [[ -x $bin ]] || die "no binary at $bin"
  mkdir -p "$dir"
  if [[ -f $dir/size && $(size) != "$n" ]]; then
    die "$dir holds a $(size)-node cluster; run 'scripts/cluster.sh reset' first"
  fi
  echo "$n" >"$dir/size"
  # One credential per audience (peer, worker, admin), made once per cluster; the node reads
  # them from its environment, so they never show on a command line.
  for kind in peer worker admin; do
    [[ -f $dir/$kind-token ]] || (umask 077 && head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/$kind-token")
  done
  for ((i = 1; i <= n; i++)); do start_node "$i"; done
  leader=$(wait_for_leader 60) || die "no leader after 60s; see scripts/cluster.sh logs 1"
  echo "hashq cluster of $n nodes is up; leader is node $leader"
  echo "endpoints: $(endpoints "$n" | tr ',' ' ')"
  echo "admin token (hashq cluster set-max-workers --admin-token ...): $dir/admin-token"
  ;;
down)
  # Nodes stop their workers when they stop; workers of a node killed earlier are orphans.
  for f in "$dir"/node-*.pid; do [[ -e $f ]] && stop_pidfile "$f"; done
  if [[ -f $dir/size ]]; then
    pattern="worker --endpoints $(endpoints "$(size)")( |$)"
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
      s=$(curl -fsS --max-time 2 "http://127.0.0.1:$(port_of "$i")/status" 2>/dev/null || echo '{}')
      state=$(echo "$s" | sed -n 's/.*"state":"\([a-z]*\)".*/\1/p' | tail -n 1)
      echo "node $i: pid $(cat "$dir/node-$i.pid"), http://127.0.0.1:$(port_of "$i"), ${state:-not answering}, leader $(leader_of "$i")"
    else
      echo "node $i: down"
    fi
  done
  workers=$(curl -fsS --max-time 2 "http://127.0.0.1:$(port_of 1)/metrics" 2>/dev/null |
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
logs)
  id=${2:-}; [[ $id =~ ^[0-9]+$ ]] || die "logs takes a node id"
  tail -n "${LINES:-200}" "$dir/node-$id.log"
  ;;
*)
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
  [[ -z $cmd ]] || exit 2
  ;;
esac
