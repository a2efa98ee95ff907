#!/usr/bin/env bash
# Side-by-side baseline for `hashq bench`'s durable-enqueue numbers, on this machine:
#   1. RabbitMQ (Debian's rabbitmq-server): 3 nodes on 127.0.0.1, one quorum queue on all 3,
#      persistent messages, publisher confirms, each client waits for its confirm.
#   2. NATS JetStream (Debian's nats-server): 3 nodes on 127.0.0.1, an R3 file stream, each
#      client waits for its PubAck.
# The load client is bench/compare (hashq-compare). Stdout gets JSON lines only: the versions,
# the NATS sync mode, then one line per run shaped like hashq bench's `enqueue` entries.
# Progress and diagnostics go to stderr. Everything started here is killed on exit.
#
# Environment:
#   BENCH_SECONDS=10          measured seconds per run
#   BENCH_WARMUP_SECONDS=2    warm-up seconds per run (not counted)
#   BENCH_CONFIGS="1:1024 64:1024 64:16384"   clients:payload_bytes per run
#   BENCH_SYSTEMS="rabbitmq nats"             which systems to run
#   BENCH_TMP=$TMPDIR or /tmp where the brokers' data dirs go (where hashq bench puts its own)
#   NATS_SYNC=always          on nats-server >= 2.10 sets jetstream.sync_interval: always
#                             (fsync per write; the Raft WAL too from 2.11); `default` keeps
#                             the server's interval. Debian 12 ships 2.9, which has no such
#                             option: the `nats_sync` line says what applied.
#   KEEP_TMP=1                keep the data dirs and logs
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_SECONDS="${BENCH_SECONDS:-10}"
BENCH_WARMUP_SECONDS="${BENCH_WARMUP_SECONDS:-2}"
BENCH_CONFIGS="${BENCH_CONFIGS:-1:1024 64:1024 64:16384}"
BENCH_SYSTEMS="${BENCH_SYSTEMS:-rabbitmq nats}"
NATS_SYNC="${NATS_SYNC:-always}"
NODES=3
RABBIT_BIN=/usr/lib/rabbitmq/bin

log() { echo "bench-compare: $*" >&2; }
die() {
	log "FAILED: $*"
	exit 1
}

# --- cleanup -----------------------------------------------------------------------------
TMP=""
PGIDS=() # process groups started here (setsid), killed on exit

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	local pg
	for pg in "${PGIDS[@]}"; do
		kill -KILL -- "-$pg" 2>/dev/null || true
	done
	for pg in "${PGIDS[@]}"; do
		wait "$pg" 2>/dev/null || true
	done
	if [[ -n "$TMP" && -d "$TMP" ]]; then
		if [[ $rc -ne 0 ]]; then
			local f
			for f in "$TMP"/logs/*; do
				[[ -f "$f" ]] || continue
				log "--- last lines of $f"
				tail -n 15 "$f" >&2 || true
			done
		fi
		if [[ "${KEEP_TMP:-0}" == 1 ]]; then
			log "kept $TMP"
		else
			rm -rf "$TMP"
		fi
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Starts "$@" in its own session and process group, so that cleanup can kill it and all its
# children (beam.smp, erl_child_setup, ...) by group. Sets STARTED_PID.
start_bg() {
	local logfile=$1
	shift
	setsid "$@" </dev/null >"$logfile" 2>&1 &
	STARTED_PID=$!
	PGIDS+=("$STARTED_PID")
}

kill_group() {
	kill -KILL -- "-$1" 2>/dev/null || true
	wait "$1" 2>/dev/null || true
	local keep=() pg
	for pg in "${PGIDS[@]}"; do
		[[ "$pg" == "$1" ]] || keep+=("$pg")
	done
	PGIDS=("${keep[@]}")
}

# --- ports -------------------------------------------------------------------------------
declare -A TAKEN=()
# A port free on 127.0.0.1 and not handed out before, in 20000-31999: below Linux's
# ephemeral range (32768+ by default), so no outgoing connection takes it before the broker
# binds it, and RabbitMQ's CLI tools, which use the node's distribution port + 10000..10010
# for themselves, stay below 42010.
free_port() {
	local p
	for _ in $(seq 200); do
		p=$((20000 + RANDOM % 12000))
		[[ -z "${TAKEN[$p]:-}" ]] || continue
		if [[ -z "$(ss -Htan "( sport = :$p )" 2>/dev/null)" ]]; then
			TAKEN[$p]=1
			echo "$p"
			return 0
		fi
	done
	die "no free port found"
}

# Waits until 127.0.0.1:$1 accepts TCP connections, or $2 seconds pass.
wait_tcp() {
	local deadline=$((SECONDS + $2))
	until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
		((SECONDS < deadline)) || return 1
		sleep 0.2
	done
}

# --- install -----------------------------------------------------------------------------
ensure_packages() {
	local missing=() pkg
	for pkg in "$@"; do
		dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
			missing+=("$pkg")
	done
	((${#missing[@]})) || return 0
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	if ! apt-get install -y "${missing[@]}" >&2; then
		apt-get update >&2 || die "apt-get update failed"
		apt-get install -y "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
	fi
	# Debian's packages may start their system service (not where policy-rc.d forbids it):
	# stop those, they would share the 2 cores with the benchmark.
	for pkg in "${missing[@]}"; do
		if command -v service >/dev/null && service "$pkg" status >/dev/null 2>&1; then
			log "stopping the $pkg service apt started"
			service "$pkg" stop >&2 || die "could not stop the $pkg service"
		fi
	done
}

pkg_version() { dpkg-query -W -f '${Version}' "$1"; }

# --- build -------------------------------------------------------------------------------
CLIENT="$ROOT/target/compare/release/hashq-compare"
build_client() {
	log "building bench/compare"
	CARGO_TARGET_DIR="$ROOT/target/compare" cargo build --release --quiet \
		--manifest-path "$ROOT/bench/compare/Cargo.toml" >&2 || die "building hashq-compare"
}

# Runs every configured load against $1 (system) with URLs $2, printing its JSON lines.
# Sets ACKED to the messages acknowledged in the measured windows (warm-ups not counted).
run_loads() {
	local system=$1 urls=$2 cfg clients bytes line n
	ACKED=0
	for cfg in $BENCH_CONFIGS; do
		clients=${cfg%%:*}
		bytes=${cfg##*:}
		log "$system: $clients clients, $bytes B payloads, ${BENCH_WARMUP_SECONDS}s warm-up + ${BENCH_SECONDS}s"
		line=$("$CLIENT" "$system" --urls "$urls" --clients "$clients" --payload-bytes "$bytes" \
			--seconds "$BENCH_SECONDS" --warmup-seconds "$BENCH_WARMUP_SECONDS") ||
			die "$system load with $clients clients, $bytes B"
		echo "$line"
		n=$(sed -n 's/.*"acknowledged":\([0-9]*\).*/\1/p' <<<"$line")
		ACKED=$((ACKED + ${n:-0}))
	done
}

# --- RabbitMQ ----------------------------------------------------------------------------
RABBIT_PIDS=()
EPMD_PID=""

# rabbit_env I: sets RENV to node I's environment (for its server and the CLI tools).
rabbit_env() {
	local i=$1 d="$TMP/rabbit$1"
	RENV=(
		"RABBITMQ_NODENAME=rabbit$i@localhost"
		"RABBITMQ_NODE_IP_ADDRESS=127.0.0.1"
		"RABBITMQ_NODE_PORT=${AMQP_PORTS[i]}"
		"RABBITMQ_DIST_PORT=${DIST_PORTS[i]}"
		"RABBITMQ_MNESIA_BASE=$d/mnesia"
		"RABBITMQ_LOG_BASE=$d/log"
		"RABBITMQ_CONFIG_FILE=$d/rabbitmq.conf"
		"RABBITMQ_ADVANCED_CONFIG_FILE=$d/advanced.config"
		"RABBITMQ_CONF_ENV_FILE=$d/rabbitmq-env.conf"
		"RABBITMQ_ENABLED_PLUGINS_FILE=$d/enabled_plugins"
		"RABBITMQ_PID_FILE=$d/rabbit.pid"
	)
}

# rabbitctl I TOOL ARGS...: a CLI tool (rabbitmqctl, rabbitmq-queues, ...) aimed at node I.
rabbitctl() {
	local i=$1 tool=$2
	shift 2
	rabbit_env "$i"
	env "${RENV[@]}" "$RABBIT_BIN/$tool" -n "rabbit$i@localhost" "$@"
}

# Waits until node I's rabbit app runs, for at most $2 seconds; fails early if it died.
rabbit_await() {
	local i=$1 deadline=$((SECONDS + $2))
	until rabbitctl "$i" rabbitmqctl -q await_startup --timeout 10 >/dev/null 2>&1; do
		kill -0 "${RABBIT_PIDS[$i]}" 2>/dev/null || die "rabbit$i exited while starting"
		((SECONDS < deadline)) || die "rabbit$i did not start in $2 s"
		sleep 0.5
	done
}

start_rabbitmq() {
	local i
	# Our own epmd on a free port, loopback only: the Erlang nodes and CLI tools find each
	# other through it instead of a system-wide one on 4369.
	ERL_EPMD_PORT=$(free_port)
	export ERL_EPMD_PORT ERL_EPMD_ADDRESS=127.0.0.1
	# Distribution (node-to-node and CLI) listens on loopback only.
	export ERL_ZFLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
	# The shared Erlang cookie: Erlang and the CLI tools read $HOME/.erlang.cookie.
	export HOME="$TMP/home"
	mkdir -p "$HOME"
	head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$HOME/.erlang.cookie"
	chmod 400 "$HOME/.erlang.cookie"

	start_bg "$TMP/logs/epmd.log" epmd -port "$ERL_EPMD_PORT" -address 127.0.0.1
	EPMD_PID=$STARTED_PID
	wait_tcp "$ERL_EPMD_PORT" 10 || die "epmd did not listen on $ERL_EPMD_PORT"

	AMQP_PORTS=() DIST_PORTS=()
	for i in $(seq "$NODES"); do
		AMQP_PORTS[i]=$(free_port)
		DIST_PORTS[i]=$(free_port)
		mkdir -p "$TMP/rabbit$i/mnesia" "$TMP/rabbit$i/log"
		# No plugins at all: the management plugin (and its stats collection) costs CPU.
		echo "[]." >"$TMP/rabbit$i/enabled_plugins"
		: >"$TMP/rabbit$i/rabbitmq-env.conf"
		cat >"$TMP/rabbit$i/rabbitmq.conf" <<-EOF
			listeners.tcp.default = 127.0.0.1:${AMQP_PORTS[i]}
			log.console = false
			log.file.level = warning
		EOF
		log "starting rabbit$i@localhost (amqp 127.0.0.1:${AMQP_PORTS[i]}, dist ${DIST_PORTS[i]})"
		rabbit_env "$i"
		# RabbitMQ's own defaults stand, e.g. `+sbwt none` (no scheduler busy-waiting).
		start_bg "$TMP/logs/rabbit$i.log" env "${RENV[@]}" "$RABBIT_BIN/rabbitmq-server"
		RABBIT_PIDS[i]=$STARTED_PID
	done
	for i in $(seq "$NODES"); do
		rabbit_await "$i" 120
	done
	for i in $(seq 2 "$NODES"); do
		log "joining rabbit$i to rabbit1"
		# (3.10's join_cluster logs harmless "tracked connection table" errors: shown on failure only)
		local out
		out=$(rabbitctl "$i" rabbitmqctl -q stop_app 2>&1 &&
			rabbitctl "$i" rabbitmqctl -q join_cluster rabbit1@localhost 2>&1 &&
			rabbitctl "$i" rabbitmqctl -q start_app 2>&1) || {
			echo "$out" >&2
			die "joining rabbit$i to rabbit1"
		}
		rabbit_await "$i" 120
	done
	local deadline=$((SECONDS + 60)) running
	while :; do
		running=$(rabbitctl 1 rabbitmqctl -q eval 'length(rabbit_nodes:all_running()).' 2>/dev/null ||
			echo 0)
		((running == NODES)) && break
		((SECONDS < deadline)) || die "RabbitMQ cluster has $running of $NODES nodes running"
		sleep 0.5
	done
	log "RabbitMQ cluster of $NODES nodes running"
}

stop_rabbitmq() {
	local i
	for i in $(seq "$NODES"); do
		[[ -n "${RABBIT_PIDS[i]:-}" ]] && kill_group "${RABBIT_PIDS[i]}"
	done
	[[ -n "$EPMD_PID" ]] && kill_group "$EPMD_PID"
	RABBIT_PIDS=()
	EPMD_PID=""
}

bench_rabbitmq() {
	start_rabbitmq
	local urls="" i
	for i in $(seq "$NODES"); do
		urls+="${urls:+,}amqp://guest:guest@127.0.0.1:${AMQP_PORTS[i]}/%2f"
	done
	"$CLIENT" rabbitmq --urls "$urls" --setup-only || die "declaring the quorum queue"
	local members
	# "hashq-compare<TAB>quorum<TAB>[rabbit1@localhost, rabbit2@localhost, rabbit3@localhost]"
	members=$(rabbitctl 1 rabbitmqctl -q list_queues name type members |
		awk -F'\t' '$1 == "hashq-compare" && $2 == "quorum" { print $3 }' |
		grep -o '@localhost' | wc -l) || die "listing the queue"
	((members == NODES)) || die "the quorum queue has $members members, not $NODES"
	log "quorum queue hashq-compare has $members members"
	run_loads rabbitmq "$urls"
	# Every confirmed message must be in the queue (the count may lag the broker by a moment).
	local deadline=$((SECONDS + 20)) messages
	while :; do
		messages=$(rabbitctl 1 rabbitmqctl -q list_queues name messages |
			awk -F'\t' '$1 == "hashq-compare" { print $2 }')
		((${messages:-0} >= ACKED)) && break
		if ((SECONDS >= deadline)); then
			log "WARNING: the queue holds ${messages:-?} messages, fewer than the $ACKED confirmed"
			break
		fi
		sleep 1
	done
	log "quorum queue holds $messages messages; $ACKED were confirmed in measured windows"
	stop_rabbitmq
}

# --- NATS --------------------------------------------------------------------------------
NATS_PIDS=()

# At least version $2 is installed, going by version $1?
version_ge() { [[ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n 1)" == "$2" ]]; }

bench_nats() {
	local version i r routes="" note sync_conf=""
	local store_fsync=false wal_fsync=false
	version=$(nats-server --version | sed -n 's/.*v\([0-9][0-9.]*\).*/\1/p')
	# JetStream acknowledges a publish once a quorum has written (write(2)) it; whether it is
	# fsynced first depends on the version and jetstream.sync_interval (nats-server source:
	# v2.9.10 server/stream.go and jetstream_cluster.go; v2.10.0 server/opts.go
	# parseJetStream; v2.11.0 passes SyncAlways on to the Raft WAL).
	if ! version_ge "$version" 2.10.0; then
		note="nats-server < 2.10 has no sync_interval option: the stream store is fsynced every 2 min and the stream's Raft WAL every 5 min, not per write"
	elif [[ "$NATS_SYNC" != always ]]; then
		note="default sync_interval: the stream store is fsynced every 2 min, not per write"
	else
		sync_conf="sync_interval: always"
		store_fsync=true
		if version_ge "$version" 2.11.0; then
			wal_fsync=true
			note="sync_interval: always: the stream store and its Raft WAL fsync every write"
		else
			note="sync_interval: always: the stream store fsyncs every write; on 2.10.x the stream's Raft WAL is still fsynced every 5 min"
		fi
	fi
	printf '{"nats_sync":{"nats_server":"%s","store_fsync_per_write":%s,"raft_wal_fsync_per_write":%s,"note":"%s"}}\n' \
		"$version" "$store_fsync" "$wal_fsync" "$note"

	NATS_PORTS=() CLUSTER_PORTS=()
	for i in $(seq "$NODES"); do
		NATS_PORTS[i]=$(free_port)
		CLUSTER_PORTS[i]=$(free_port)
		routes+="${routes:+, }nats-route://127.0.0.1:${CLUSTER_PORTS[i]}"
	done
	for i in $(seq "$NODES"); do
		mkdir -p "$TMP/nats$i"
		cat >"$TMP/nats$i/nats.conf" <<-EOF
			server_name: n$i
			host: 127.0.0.1
			port: ${NATS_PORTS[i]}
			jetstream {
			  store_dir: "$TMP/nats$i/store"
			  $sync_conf
			}
			cluster {
			  name: hashq-compare
			  host: 127.0.0.1
			  port: ${CLUSTER_PORTS[i]}
			  routes: [ $routes ]
			}
		EOF
		log "starting nats n$i (client 127.0.0.1:${NATS_PORTS[i]}, cluster ${CLUSTER_PORTS[i]})"
		start_bg "$TMP/logs/nats$i.log" nats-server -c "$TMP/nats$i/nats.conf"
		NATS_PIDS[i]=$STARTED_PID
	done
	local urls=""
	for i in $(seq "$NODES"); do
		wait_tcp "${NATS_PORTS[i]}" 30 || die "nats n$i did not listen"
		urls+="${urls:+,}nats://127.0.0.1:${NATS_PORTS[i]}"
	done
	# Creating the stream retries until JetStream's meta leader is elected and all 3 peers are
	# placed (at most 60 s).
	"$CLIENT" nats --urls "$urls" --setup-only || die "creating the R3 stream"
	run_loads nats "$urls"
	log "NATS stream after the runs ($ACKED acknowledged in measured windows):"
	"$CLIENT" nats --urls "$urls" --setup-only || die "reading the stream's state"
	for r in "${NATS_PIDS[@]}"; do
		kill_group "$r"
	done
	NATS_PIDS=()
}

# --- main --------------------------------------------------------------------------------
command -v cargo >/dev/null || die "cargo is needed to build bench/compare"
need=()
for s in $BENCH_SYSTEMS; do
	case "$s" in
	rabbitmq) need+=(rabbitmq-server) ;;
	nats) need+=(nats-server) ;;
	*) die "unknown system $s (BENCH_SYSTEMS: rabbitmq, nats)" ;;
	esac
done
ensure_packages "${need[@]}"
for proc in beam.smp nats-server; do
	if pgrep -x "$proc" >/dev/null; then
		log "WARNING: a $proc not started here is running; it shares the CPUs with the benchmark"
	fi
done
build_client

TMP=$(mktemp -d "${BENCH_TMP:-${TMPDIR:-/tmp}}/hashq-compare.XXXXXX")
mkdir -p "$TMP/logs"
log "data and logs in $TMP"

versions="{\"versions\":{"
if [[ " $BENCH_SYSTEMS " == *" rabbitmq "* ]]; then
	otp=$(cat /usr/lib/erlang/releases/*/OTP_VERSION 2>/dev/null | head -n 1)
	versions+="\"rabbitmq_server\":\"$(pkg_version rabbitmq-server)\",\"erlang_otp\":\"$otp\",\"erlang_base\":\"$(pkg_version erlang-base)\","
fi
if [[ " $BENCH_SYSTEMS " == *" nats "* ]]; then
	versions+="\"nats_server\":\"$(nats-server --version | awk '{print $NF}' | tr -d v)\",\"nats_server_deb\":\"$(pkg_version nats-server)\","
fi
versions+="\"kernel\":\"$(uname -r)\",\"cpus\":$(nproc)}}"
echo "$versions"

for s in $BENCH_SYSTEMS; do
	"bench_$s"
done
log "done"
