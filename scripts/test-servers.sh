#!/usr/bin/env bash
# Local S3-compatible servers for offsite's tests: Garage (a real distributed
# object store, single node) and s3s-fs (a small S3 server over a directory),
# plus moto (a Python AWS emulator) with a bucket that has Object Lock
# enabled, used only for what the real stores lack (Object Lock, versioning).
#
#   scripts/test-servers.sh install   # build/install the servers (only if missing)
#   scripts/test-servers.sh start     # start all three (fresh data), set up keys + buckets
#   source /tmp/offsite-test-servers/env
#   cargo test --features testing
#   scripts/test-servers.sh stop
#   scripts/test-servers.sh status
#   scripts/test-servers.sh start-cluster   # a 3-node Garage cluster too (replication factor 3)
#   scripts/test-servers.sh cluster-node stop|start N   # kill / restart node N (1-3)
#
# Environment:
#   OFFSITE_SERVERS_ROOT   install prefix (binaries in $ROOT/bin)  [/opt/offsite-test-servers]
#   OFFSITE_SERVERS_STATE  data, logs, pid files, env file         [/tmp/offsite-test-servers]
#   OFFSITE_GARAGE_PORT    Garage S3 port; RPC = +1, admin = +3    [39000]
#   OFFSITE_S3S_PORT       s3s-fs port                             [39010]
#   OFFSITE_MOTO_PORT      moto server port                        [39020]
#   OFFSITE_GARAGE_CLUSTER_PORT  node 1's S3 port; node N uses +10*(N-1),
#                          RPC = +1, admin = +3                    [29100]
#
# The cluster (three Garage processes on 127.0.0.1, one zone each, every
# object on all three) is only for the test that stops a node while shipping
# and restoring (tests/it/cluster.rs); it reuses the garage binary and is
# started by scripts/test.sh, or by hand with start-cluster. Its S3 URL is
# exported as OFFSITE_TEST_GARAGE_CLUSTER (node 1's endpoint).
#
# moto is installed with pip into a venv at $ROOT/moto. Its Object Lock
# bucket is exported separately as OFFSITE_TEST_S3_LOCK_TARGET (it is not in
# OFFSITE_TEST_S3_TARGETS: an emulator is never proof that shipping works).
#
# The access key below is a fixed, throwaway test key for servers bound to
# 127.0.0.1 only. Never use it anywhere else.
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"

ROOT=${OFFSITE_SERVERS_ROOT:-/opt/offsite-test-servers}
STATE=${OFFSITE_SERVERS_STATE:-/tmp/offsite-test-servers}
BIN="$ROOT/bin"
GARAGE_BIN="$BIN/garage"
S3S_BIN="$BIN/s3s-fs"
GARAGE_VERSION=2.5.0
S3S_VERSION=0.14.1
MOTO_VENV="$ROOT/moto"
MOTO_BIN="$MOTO_VENV/bin/moto_server"
MOTO_PY="$MOTO_VENV/bin/python"
MOTO_SPEC='moto[server]>=5,<6'

GARAGE_PORT=${OFFSITE_GARAGE_PORT:-39000}
GARAGE_RPC_PORT=$((GARAGE_PORT + 1))
GARAGE_ADMIN_PORT=$((GARAGE_PORT + 3))
S3S_PORT=${OFFSITE_S3S_PORT:-39010}
MOTO_PORT=${OFFSITE_MOTO_PORT:-39020}
HOST=127.0.0.1

BUCKET=offsite-test
LOCK_BUCKET=offsite-lock
KEY_NAME=offsite-test
# "GK" + 24 hex digits / 64 hex digits, as Garage requires ("offsite-test" in hex).
ACCESS_KEY=GK6f6666736974652d74657374
SECRET_KEY=6f6666736974652d746573742d7365637265742d6e6f742d612d7265616c2d31
RPC_SECRET=6f6666736974652d746573742d7270632d7365637265742d6e6f742d7265616c
ADMIN_TOKEN=offsite-test-admin-token
REGION=garage

# Below Linux's ephemeral port range (32768-60999), so no outgoing
# connection holds a port a restarted node needs.
CLUSTER_PORT=${OFFSITE_GARAGE_CLUSTER_PORT:-29100}
CLUSTER_DIR="$STATE/garage-cluster"

GARAGE_DIR="$STATE/garage"
GARAGE_CONF="$GARAGE_DIR/garage.toml"
S3S_DIR="$STATE/s3s"
MOTO_DIR="$STATE/moto"
ENV_FILE="$STATE/env"
START_TIMEOUT=${OFFSITE_SERVERS_START_TIMEOUT:-30}

log() { echo "test-servers: $*" >&2; }
die() {
    echo "test-servers: ERROR: $*" >&2
    exit 1
}

# ---------------------------------------------------------------- helpers

# pid_of NAME -> prints the pid if NAME's pid file names a live process that
# runs our binary; nothing otherwise.
pid_of() {
    local name=$1 bin=$2 pidfile="$STATE/$1.pid" pid
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile" 2>/dev/null || true)
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    if kill -0 "$pid" 2>/dev/null && [[ -r /proc/$pid/cmdline ]] &&
        tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$bin"; then
        echo "$pid"
    fi
    return 0
}

# port_open PORT -> success if something accepts TCP connections on HOST:PORT.
port_open() {
    (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

# http_status PORT PATH [AUTH_HEADER] -> prints the HTTP status code (or 000).
http_status() {
    local port=$1 path=$2 auth=${3:-}
    if command -v curl >/dev/null 2>&1; then
        # curl prints 000 itself when it cannot connect (and exits non-zero):
        # print exactly one code either way.
        local code
        if [[ -n $auth ]]; then
            code=$(curl -s -o /dev/null -m 5 -w '%{http_code}' -H "$auth" "http://$HOST:$port$path") || code=000
        else
            code=$(curl -s -o /dev/null -m 5 -w '%{http_code}' "http://$HOST:$port$path") || code=000
        fi
        echo "${code:-000}"
        return 0
    fi
    # No curl: speak HTTP/1.0 over bash's /dev/tcp.
    local line
    line=$(
        exec 2>/dev/null
        exec 3<>"/dev/tcp/$HOST/$port" || exit 0
        printf 'GET %s HTTP/1.0\r\nHost: %s:%s\r\n%s\r\n' "$path" "$HOST" "$port" \
            "${auth:+$auth$'\r\n'}" >&3
        timeout 5 head -n 1 <&3 || true
    ) || true
    line=${line#HTTP/* }
    echo "${line:0:3}" | grep -E '^[0-9]{3}$' || echo 000
}

# show_log_tail FILE
show_log_tail() {
    if [[ -f $1 ]]; then
        echo "---- last lines of $1 ----" >&2
        tail -n 30 "$1" >&2 || true
        echo "----" >&2
    fi
}

# wait_for DESCRIPTION LOGFILE PID COMMAND... -> polls COMMAND until it succeeds.
wait_for() {
    local what=$1 logfile=$2 pid=$3
    shift 3
    local deadline=$((SECONDS + START_TIMEOUT))
    until "$@"; do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            show_log_tail "$logfile"
            die "$what: the server process ($pid) exited; see the log above ($logfile)"
        fi
        if ((SECONDS >= deadline)); then
            show_log_tail "$logfile"
            die "$what: not ready after ${START_TIMEOUT}s (log: $logfile)"
        fi
        sleep 0.2
    done
}

# check_port_free NAME PORT -> dies if something that is not ours listens there.
check_port_free() {
    if port_open "$2"; then
        die "port $HOST:$2 (needed by $1) is in use by a process that is not a test server started by this script (no live pid file in $STATE). Stop it, or choose other ports with OFFSITE_GARAGE_PORT / OFFSITE_S3S_PORT"
    fi
}

# spawn LOGFILE PIDFILE COMMAND... -> runs COMMAND detached, records its pid.
spawn() {
    local logfile=$1 pidfile=$2
    shift 2
    if command -v setsid >/dev/null 2>&1; then
        setsid "$@" </dev/null >"$logfile" 2>&1 &
    else
        nohup "$@" </dev/null >"$logfile" 2>&1 &
    fi
    echo $! >"$pidfile"
    echo $!
}

garage() { "$GARAGE_BIN" -c "$GARAGE_CONF" "$@"; }

# ---------------------------------------------------------------- install

cmd_install() {
    mkdir -p "$ROOT"
    local need=0
    [[ -x $GARAGE_BIN ]] || need=1
    [[ -x $S3S_BIN ]] || need=1
    if ((need)) && ! command -v cargo >/dev/null 2>&1; then
        die "cargo is not installed; install Rust (https://rustup.rs) to build the test servers"
    fi
    if ((need)) && ! command -v cc >/dev/null 2>&1; then
        if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
            log "installing a C toolchain (build-essential) for the server builds"
            apt-get update -qq && apt-get install -y -qq build-essential pkg-config
        else
            die "no C compiler (cc) found; install build-essential (or equivalent)"
        fi
    fi
    if [[ -x $GARAGE_BIN ]]; then
        log "garage already installed: $GARAGE_BIN"
    else
        log "building garage $GARAGE_VERSION (takes ~10 minutes)"
        cargo install --locked garage --version "$GARAGE_VERSION" --root "$ROOT"
    fi
    if [[ -x $S3S_BIN ]]; then
        log "s3s-fs already installed: $S3S_BIN"
    else
        log "building s3s-fs $S3S_VERSION (takes ~5 minutes)"
        cargo install --locked s3s-fs --version "$S3S_VERSION" --features binary --root "$ROOT"
    fi
    install_moto
}

install_moto() {
    if [[ -x $MOTO_BIN && -x $MOTO_PY ]] && "$MOTO_PY" -c 'import moto, boto3' 2>/dev/null; then
        log "moto already installed: $MOTO_BIN"
        return 0
    fi
    command -v python3 >/dev/null 2>&1 ||
        die "python3 is not installed; install it (Debian: apt-get install python3 python3-venv) for the moto test server"
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
            log "installing python3-venv for the moto test server"
            apt-get update -qq && apt-get install -y -qq python3-venv
        else
            die "python3 cannot create virtual environments; install python3-venv"
        fi
    fi
    log "installing moto into $MOTO_VENV (takes ~20 seconds)"
    rm -rf "$MOTO_VENV"
    python3 -m venv "$MOTO_VENV"
    "$MOTO_VENV/bin/pip" install -q --disable-pip-version-check "$MOTO_SPEC"
    [[ -x $MOTO_BIN ]] || die "moto installed, but $MOTO_BIN is missing"
}

# ---------------------------------------------------------------- start

write_garage_config() {
    mkdir -p "$GARAGE_DIR/meta" "$GARAGE_DIR/data"
    (
        umask 077
        cat >"$GARAGE_CONF" <<EOF
metadata_dir = "$GARAGE_DIR/meta"
data_dir = "$GARAGE_DIR/data"
db_engine = "lmdb"
replication_factor = 1

rpc_bind_addr = "$HOST:$GARAGE_RPC_PORT"
rpc_public_addr = "$HOST:$GARAGE_RPC_PORT"
rpc_secret = "$RPC_SECRET"

[s3_api]
s3_region = "$REGION"
api_bind_addr = "$HOST:$GARAGE_PORT"

[admin]
api_bind_addr = "$HOST:$GARAGE_ADMIN_PORT"
admin_token = "$ADMIN_TOKEN"
EOF
    )
}

garage_healthy() { [[ $(http_status "$GARAGE_ADMIN_PORT" /health) == 200 ]]; }
garage_rpc_ready() { garage status >/dev/null 2>&1; }

# Idempotent: layout, key, bucket, permissions.
setup_garage() {
    local pid=$1 logfile="$GARAGE_DIR/garage.log"
    wait_for "garage RPC" "$logfile" "$pid" garage_rpc_ready
    local version
    version=$(garage layout show 2>/dev/null | sed -n 's/^Current cluster layout version: *\([0-9]*\).*/\1/p')
    if [[ ${version:-0} == 0 ]]; then
        local node_id
        node_id=$(garage node id -q | cut -d@ -f1)
        [[ -n $node_id ]] || die "could not read the garage node id (log: $logfile)"
        garage layout assign -z dc1 -c 1G "$node_id" >/dev/null
        garage layout apply --version 1 >/dev/null
    fi
    wait_for "garage health (layout applied)" "$logfile" "$pid" garage_healthy
    if ! garage key info "$KEY_NAME" >/dev/null 2>&1; then
        garage key import --yes -n "$KEY_NAME" "$ACCESS_KEY" "$SECRET_KEY" >/dev/null
    fi
    if ! garage bucket info "$BUCKET" >/dev/null 2>&1; then
        garage bucket create "$BUCKET" >/dev/null
    fi
    garage bucket allow --read --write --owner "$BUCKET" --key "$KEY_NAME" >/dev/null
}

start_garage() {
    local pid logfile="$GARAGE_DIR/garage.log"
    pid=$(pid_of garage "$GARAGE_BIN")
    if [[ -n $pid ]]; then
        log "garage already running (pid $pid)"
    else
        check_port_free garage "$GARAGE_PORT"
        check_port_free "garage RPC" "$GARAGE_RPC_PORT"
        check_port_free "garage admin" "$GARAGE_ADMIN_PORT"
        rm -rf "$GARAGE_DIR"
        write_garage_config
        pid=$(spawn "$logfile" "$STATE/garage.pid" "$GARAGE_BIN" -c "$GARAGE_CONF" server)
        log "garage started (pid $pid, S3 http://$HOST:$GARAGE_PORT, log $logfile)"
    fi
    wait_for "garage S3 API on port $GARAGE_PORT" "$logfile" "$pid" port_open "$GARAGE_PORT"
    setup_garage "$pid"
}

start_s3s() {
    local pid logfile="$S3S_DIR/s3s.log"
    pid=$(pid_of s3s "$S3S_BIN")
    if [[ -n $pid ]]; then
        log "s3s-fs already running (pid $pid)"
    else
        check_port_free s3s-fs "$S3S_PORT"
        rm -rf "$S3S_DIR"
        mkdir -p "$S3S_DIR/data"
        pid=$(spawn "$logfile" "$STATE/s3s.pid" "$S3S_BIN" --host "$HOST" --port "$S3S_PORT" \
            --access-key "$ACCESS_KEY" --secret-key "$SECRET_KEY" "$S3S_DIR/data")
        log "s3s-fs started (pid $pid, S3 http://$HOST:$S3S_PORT, log $logfile)"
    fi
    # s3s-fs maps buckets to directories under its root.
    mkdir -p "$S3S_DIR/data/$BUCKET"
    wait_for "s3s-fs on port $S3S_PORT" "$logfile" "$pid" port_open "$S3S_PORT"
}

moto_ready() { [[ $(http_status "$MOTO_PORT" /moto-api/) != 000 ]]; }

start_moto() {
    local pid logfile="$MOTO_DIR/moto.log"
    pid=$(pid_of moto "$MOTO_BIN")
    if [[ -n $pid ]]; then
        log "moto already running (pid $pid)"
    else
        check_port_free moto "$MOTO_PORT"
        rm -rf "$MOTO_DIR"
        mkdir -p "$MOTO_DIR"
        pid=$(spawn "$logfile" "$STATE/moto.pid" "$MOTO_BIN" -H "$HOST" -p "$MOTO_PORT")
        log "moto started (pid $pid, S3 http://$HOST:$MOTO_PORT, log $logfile)"
    fi
    wait_for "moto on port $MOTO_PORT" "$logfile" "$pid" moto_ready
    # moto keeps everything in memory: (re)create the Object Lock bucket.
    # boto3 comes with moto; moto accepts any credentials.
    MOTO_ENDPOINT="http://$HOST:$MOTO_PORT" LOCK_BUCKET=$LOCK_BUCKET "$MOTO_PY" - <<'PY' ||
import os
import boto3
s3 = boto3.client(
    "s3",
    endpoint_url=os.environ["MOTO_ENDPOINT"],
    region_name="us-east-1",
    aws_access_key_id="test",
    aws_secret_access_key="test",
)
bucket = os.environ["LOCK_BUCKET"]
names = [b["Name"] for b in s3.list_buckets().get("Buckets", [])]
if bucket not in names:
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
cfg = s3.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"]
assert cfg.get("ObjectLockEnabled") == "Enabled", cfg
PY
        die "could not create the Object Lock bucket $LOCK_BUCKET in moto (log: $logfile)"
}

write_env() {
    local garage_url="s3://$BUCKET?endpoint=http://$HOST:$GARAGE_PORT&region=$REGION&force-path-style=true"
    local s3s_url="s3://$BUCKET?endpoint=http://$HOST:$S3S_PORT&region=$REGION&force-path-style=true"
    local lock_url="s3://$LOCK_BUCKET?endpoint=http://$HOST:$MOTO_PORT&region=us-east-1&force-path-style=true"
    (
        umask 077
        cat >"$ENV_FILE.tmp" <<EOF
# Written by scripts/test-servers.sh; source it before running the tests.
export AWS_ACCESS_KEY_ID=$ACCESS_KEY
export AWS_SECRET_ACCESS_KEY=$SECRET_KEY
export AWS_REGION=$REGION
export OFFSITE_TEST_S3_TARGETS="garage=$garage_url;s3s=$s3s_url"
# moto (emulator) bucket with Object Lock enabled; only for Object Lock tests.
export OFFSITE_TEST_S3_LOCK_TARGET="moto=$lock_url"
# For tests that start (and stop) a private S3 server of their own.
export OFFSITE_TEST_S3S_BIN=$S3S_BIN
EOF
        if cluster_running; then
            cat >>"$ENV_FILE.tmp" <<EOF
# 3-node Garage cluster (replication factor 3) for the test that stops a
# node; OFFSITE_TEST_GARAGE_CLUSTER_CTL cluster-node stop|start N.
export OFFSITE_TEST_GARAGE_CLUSTER="s3://$BUCKET?endpoint=http://$HOST:$CLUSTER_PORT&region=$REGION&force-path-style=true"
export OFFSITE_TEST_GARAGE_CLUSTER_CTL=$SELF
export OFFSITE_SERVERS_STATE=$STATE
export OFFSITE_GARAGE_CLUSTER_PORT=$CLUSTER_PORT
EOF
        fi
        mv "$ENV_FILE.tmp" "$ENV_FILE"
    )
}

cmd_start() {
    [[ -x $GARAGE_BIN && -x $S3S_BIN && -x $MOTO_BIN ]] ||
        die "test servers are not installed in $ROOT; run: $0 install"
    mkdir -p "$STATE"
    start_garage
    start_s3s
    start_moto
    write_env
    log "ready. Now run: source $ENV_FILE"
}

# ---------------------------------------------------------------- 3-node cluster

node_port() { echo $((CLUSTER_PORT + 10 * ($1 - 1))); }
node_conf() { echo "$CLUSTER_DIR/node$1/garage.toml"; }
node_garage() {
    local n=$1
    shift
    "$GARAGE_BIN" -c "$(node_conf "$n")" "$@"
}

write_node_config() {
    local n=$1 port d
    port=$(node_port "$n")
    d="$CLUSTER_DIR/node$n"
    mkdir -p "$d/meta" "$d/data"
    (
        umask 077
        cat >"$d/garage.toml" <<EOF
metadata_dir = "$d/meta"
data_dir = "$d/data"
db_engine = "lmdb"
replication_factor = 3

rpc_bind_addr = "$HOST:$((port + 1))"
rpc_public_addr = "$HOST:$((port + 1))"
rpc_secret = "$RPC_SECRET"

[s3_api]
s3_region = "$REGION"
api_bind_addr = "$HOST:$port"

[admin]
api_bind_addr = "$HOST:$((port + 3))"
admin_token = "$ADMIN_TOKEN"
EOF
    )
}

node_pid() { pid_of "garage-node$1" "$(node_conf "$1")"; }

# start_node N -> starts node N if it is not running (keeps its data).
start_node() {
    local n=$1 pid port logfile
    port=$(node_port "$n")
    logfile="$CLUSTER_DIR/node$n/garage.log"
    pid=$(node_pid "$n")
    if [[ -n $pid ]]; then
        return 0
    fi
    check_port_free "garage cluster node $n" "$port"
    check_port_free "garage cluster node $n RPC" "$((port + 1))"
    [[ -f $(node_conf "$n") ]] || write_node_config "$n"
    pid=$(spawn "$logfile" "$STATE/garage-node$n.pid" "$GARAGE_BIN" -c "$(node_conf "$n")" server)
    log "garage cluster node $n started (pid $pid, S3 http://$HOST:$port)"
    wait_for "garage cluster node $n S3 API" "$logfile" "$pid" port_open "$port"
}

node_connect() { node_garage "$1" node connect "$2" >/dev/null 2>&1; }
node_healthy() { [[ $(http_status "$(($(node_port "$1") + 3))" /health) == 200 ]]; }
cluster_rpc_ready() { node_garage 1 status >/dev/null 2>&1; }

cluster_running() {
    local n
    for n in 1 2 3; do
        [[ -n $(node_pid "$n") ]] || return 1
    done
}

cmd_start_cluster() {
    [[ -x $GARAGE_BIN ]] || die "garage is not installed in $ROOT; run: $0 install"
    mkdir -p "$STATE"
    local n
    local any=0
    for n in 1 2 3; do
        [[ -n $(node_pid "$n") ]] && any=1
    done
    # Fresh data unless some node still runs (then the others rejoin it).
    ((any)) || rm -rf "$CLUSTER_DIR"
    for n in 1 2 3; do start_node "$n"; done
    wait_for "garage cluster RPC" "$CLUSTER_DIR/node1/garage.log" "$(node_pid 1)" cluster_rpc_ready
    local version
    version=$(node_garage 1 layout show 2>/dev/null | sed -n 's/^Current cluster layout version: *\([0-9]*\).*/\1/p')
    if [[ ${version:-0} == 0 ]]; then
        local ids=()
        for n in 1 2 3; do
            ids+=("$(node_garage "$n" node id -q)")
            [[ -n ${ids[-1]} ]] || die "could not read the id of garage cluster node $n"
        done
        node_garage 1 node connect "${ids[1]}" >/dev/null
        node_garage 1 node connect "${ids[2]}" >/dev/null
        for n in 1 2 3; do
            node_garage 1 layout assign -z "dc$n" -c 1G "${ids[$((n - 1))]%@*}" >/dev/null
        done
        node_garage 1 layout apply --version 1 >/dev/null
    fi
    for n in 1 2 3; do
        wait_for "garage cluster node $n health" "$CLUSTER_DIR/node$n/garage.log" "$(node_pid "$n")" node_healthy "$n"
    done
    if ! node_garage 1 key info "$KEY_NAME" >/dev/null 2>&1; then
        node_garage 1 key import --yes -n "$KEY_NAME" "$ACCESS_KEY" "$SECRET_KEY" >/dev/null
    fi
    if ! node_garage 1 bucket info "$BUCKET" >/dev/null 2>&1; then
        node_garage 1 bucket create "$BUCKET" >/dev/null
    fi
    node_garage 1 bucket allow --read --write --owner "$BUCKET" --key "$KEY_NAME" >/dev/null
    write_env
    log "garage cluster ready (3 nodes, replication factor 3, S3 http://$HOST:$CLUSTER_PORT)"
}

cmd_stop_cluster() {
    local n
    for n in 1 2 3; do stop_one "garage-node$n" "$(node_conf "$n")"; done
}

# cluster-node stop|start N: a crash (SIGKILL) of node N, or its restart
# with the data it had.
cmd_cluster_node() {
    local what=${1:-} n=${2:-} pid
    [[ $n =~ ^[123]$ ]] || die "cluster-node: give a node number 1, 2 or 3"
    case $what in
    stop)
        pid=$(node_pid "$n")
        if [[ -n $pid ]]; then
            kill -9 "$pid" 2>/dev/null || true
            while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
        fi
        rm -f "$STATE/garage-node$n.pid"
        log "garage cluster node $n killed"
        ;;
    start)
        start_node "$n"
        # A restarted node does not always find its peers again by itself
        # (Garage 2.5 kept one isolated, answering 503 "quorum not
        # available", with both peers up): connect it to each.
        local m id
        for m in 1 2 3; do
            [[ $m != "$n" && -n $(node_pid "$m") ]] || continue
            id=$(node_garage "$m" node id -q 2>/dev/null) || continue
            wait_for "garage cluster node $n connecting to node $m" "$CLUSTER_DIR/node$n/garage.log" \
                "$(node_pid "$n")" node_connect "$n" "$id"
        done
        for m in 1 2 3; do
            [[ -n $(node_pid "$m") ]] || continue
            wait_for "garage cluster node $m health" "$CLUSTER_DIR/node$m/garage.log" "$(node_pid "$m")" node_healthy "$m"
        done
        ;;
    *) die "cluster-node: stop or start" ;;
    esac
}

# ---------------------------------------------------------------- stop / status

stop_one() {
    local name=$1 bin=$2 pid
    pid=$(pid_of "$name" "$bin")
    if [[ -z $pid ]]; then
        log "$name not running"
        rm -f "$STATE/$name.pid"
        return 0
    fi
    kill "$pid" 2>/dev/null || true
    local i
    for i in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) did not exit after SIGTERM; sending SIGKILL"
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/$name.pid"
    log "$name stopped (pid $pid)"
}

cmd_stop() {
    stop_one garage "$GARAGE_BIN"
    stop_one s3s "$S3S_BIN"
    stop_one moto "$MOTO_BIN"
    if [[ -d $CLUSTER_DIR ]]; then
        cmd_stop_cluster
    fi
}

cmd_status() {
    local rc=0 pid
    pid=$(pid_of garage "$GARAGE_BIN")
    if [[ -n $pid ]]; then
        echo "garage: running (pid $pid), S3 http://$HOST:$GARAGE_PORT, health $(http_status "$GARAGE_ADMIN_PORT" /health)"
    else
        echo "garage: stopped"
        rc=3
    fi
    pid=$(pid_of s3s "$S3S_BIN")
    if [[ -n $pid ]]; then
        echo "s3s-fs: running (pid $pid), S3 http://$HOST:$S3S_PORT"
    else
        echo "s3s-fs: stopped"
        rc=3
    fi
    pid=$(pid_of moto "$MOTO_BIN")
    if [[ -n $pid ]]; then
        echo "moto: running (pid $pid), S3 http://$HOST:$MOTO_PORT, bucket $LOCK_BUCKET (Object Lock)"
    else
        echo "moto: stopped"
        rc=3
    fi
    if [[ -d $CLUSTER_DIR ]]; then
        local n
        for n in 1 2 3; do
            pid=$(node_pid "$n")
            if [[ -n $pid ]]; then
                echo "garage cluster node $n: running (pid $pid), S3 http://$HOST:$(node_port "$n")"
            else
                echo "garage cluster node $n: stopped"
            fi
        done
    fi
    if [[ -f $ENV_FILE ]]; then
        echo "env file: $ENV_FILE"
    fi
    return $rc
}

usage() {
    sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
restart)
    cmd_stop
    cmd_start
    ;;
status) cmd_status ;;
start-cluster) cmd_start_cluster ;;
stop-cluster) cmd_stop_cluster ;;
cluster-node)
    shift
    cmd_cluster_node "$@"
    ;;
env) echo "$ENV_FILE" ;;
-h | --help | help) usage ;;
*)
    usage >&2
    exit 2
    ;;
esac
