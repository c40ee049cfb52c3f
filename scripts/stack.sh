#!/usr/bin/env bash
# The local development stack, without Docker: a private PostgreSQL cluster (a second one
# that accepts TLS connections only, on the next port, and a streaming replica of the
# first on the port after) and single-node Garage S3 servers, all on loopback, state
# under .stack/ (git-ignored).
#
#   scripts/stack.sh up      install what is missing, start both, create key and buckets
#   scripts/stack.sh down    stop both (data is kept)
#   scripts/stack.sh env     print `export ...` lines: eval "$(scripts/stack.sh env)"
#   scripts/stack.sh status  say what runs
#   scripts/stack.sh reset   down, then delete all state
#   scripts/stack.sh pg-restart   restart PostgreSQL (fast shutdown: sessions are cut)
#   scripts/stack.sh garage-path  print where the Garage binary is cached (built or not)
#   scripts/stack.sh lmdb-up      also start a Garage on LMDB metadata (the benchmark's
#                                 second server configuration; the others use SQLite)
#   scripts/stack.sh tools-path   print where the tools' virtualenv is kept (installed or
#                                 not): moto's server, and Django with django-storages for
#                                 the Django round trip (moto-path: the same). `up` also
#                                 installs Debian's Rails 6.1 packages for the Rails one
#
# Settings (environment): RELOCATOR_PG_PORT (54329), RELOCATOR_S3_PORT (39000; the
# second endpoint takes +10), RELOCATOR_STACK_DIR (.stack), RELOCATOR_CACHE_DIR (where the
# Garage binary is built once and reused by every checkout; ~/.cache/relocator).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${RELOCATOR_STACK_DIR:-$ROOT/.stack}
PG_PORT=${RELOCATOR_PG_PORT:-54329}
S3_PORT=${RELOCATOR_S3_PORT:-39000}
GARAGE_VERSION=2.5.0
CACHE=${RELOCATOR_CACHE_DIR:-${XDG_CACHE_HOME:-${HOME:-$ROOT/.stack}/.cache}/relocator}
TOOLS=$STATE/tools

PG_USER=relocator
PG_PASSWORD=relocator
PG_DB=relocator
REGION=garage
BUCKETS=(legacy-s3 production-s3)

# The plain-http loopback endpoint needs no CA bundle, and some tools refuse to start
# when AWS_CA_BUNDLE points at one for an http endpoint.
unset AWS_CA_BUNDLE

die() { echo "stack.sh: $*" >&2; exit 1; }
say() { echo "stack.sh: $*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# ---------------------------------------------------------------- PostgreSQL

pg_bindir() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$d" ] || [ ! -x "$d/initdb" ]; then
        say "PostgreSQL server binaries not found; installing Debian's postgresql package"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        if [ -n "$sudo" ] && ! command -v sudo >/dev/null; then
            die "cannot install postgresql: not root and no sudo. Install the 'postgresql' package, then rerun."
        fi
        $sudo apt-get update -qq >&2 || die "apt-get update failed; install the 'postgresql' package by hand, then rerun"
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >&2 \
            || die "apt-get install postgresql failed; install it by hand, then rerun"
        d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
        [ -x "$d/initdb" ] || die "postgresql installed but no initdb under /usr/lib/postgresql/*/bin"
    fi
    echo "$d"
}

# Postgres refuses to run as root: as root, run its binaries as the 'postgres' user.
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# A throwaway CA, a server certificate for "localhost" (DNS name only: connecting by
# 127.0.0.1 under sslmode=verify-full is a host name mismatch) and a second CA that signed
# nothing, for the TLS-only cluster and the tests of sslmode/sslrootcert.
tls_certs() {
    local d=$STATE/tls
    [ -f "$d/server.crt" ] && return 0
    command -v openssl >/dev/null || die "openssl not found: install the 'openssl' package, then rerun"
    mkdir -p "$d"
    (
        cd "$d"
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=relocator test CA" \
            -keyout ca.key -out ca.crt
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=some other CA" \
            -keyout wrong-ca.key -out wrong-ca.crt
        openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" -keyout server.key -out server.csr
        printf 'subjectAltName=DNS:localhost\n' >server.ext
        openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
            -extfile server.ext -out server.crt
        # A client certificate for the role tls_cert (authenticated by it alone).
        openssl req -newkey rsa:2048 -nodes -subj "/CN=tls_cert" -keyout client.key -out client.csr
        printf 'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n' >client.ext
        openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
            -extfile client.ext -out client.crt
        chmod 600 client.key
    ) >"$STATE/tls.log" 2>&1 || die "making the test certificates failed, see $STATE/tls.log"
}

# Start the cluster in $STATE/$1 on port $2 with server options $3, unless it runs.
pg_start() {
    local name=$1 port=$2 opts=$3 bin dir=$STATE/$1
    bin=$(pg_bindir)
    if as_pg "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        say "PostgreSQL ($name) already running on 127.0.0.1:$port"
    else
        port_open "$port" && die "port $port is taken by another process; stop it or set RELOCATOR_PG_PORT"
        # The port lies in Linux's ephemeral range: a client connection of the moment may
        # hold it as its local port, and the bind fails. Such a connection is short: retry.
        local try
        for try in 1 2 3 4 5; do
            if as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start -o "$opts" \
                >/dev/null; then
                break
            fi
            grep -q "Address already in use" "$dir/server.log" 2>/dev/null && [ "$try" -lt 5 ] \
                || { tail -n 20 "$dir/server.log" >&2 2>/dev/null || true
                     die "PostgreSQL ($name) did not start, see $dir/server.log"; }
            say "port $port was in use for a moment; starting PostgreSQL ($name) again"
            sleep 1
        done
        say "PostgreSQL ($name) started on 127.0.0.1:$port"
    fi
}

# One private cluster: $1 = its directory under the state directory, $2 = port,
# $3 = "tls" for a cluster that accepts TLS connections only.
pg_up() {
    local name=$1 port=$2 tls=${3:-} bin
    local dir=$STATE/$name pgdata=$STATE/$name/data
    bin=$(pg_bindir)
    mkdir -p "$dir"
    if [ "$(id -u)" -eq 0 ]; then
        id postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' user (install the postgresql package)"
        chown postgres "$dir"
        as_pg test -x "$dir" \
            || die "the 'postgres' user cannot reach $dir; set RELOCATOR_STACK_DIR to a directory it can traverse"
    fi
    if [ ! -f "$pgdata/PG_VERSION" ]; then
        say "initialising PostgreSQL cluster in $pgdata"
        local pw
        pw=$(mktemp)
        echo "$PG_PASSWORD" >"$pw"
        chmod 644 "$pw"
        as_pg "$bin/initdb" -D "$pgdata" -U "$PG_USER" --pwfile="$pw" --auth=scram-sha-256 \
            -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 \
            || { rm -f "$pw"; die "initdb failed, see $dir/initdb.log"; }
        rm -f "$pw"
        if [ "$tls" = tls ]; then
            tls_certs
            cp "$STATE/tls/server.crt" "$STATE/tls/server.key" "$STATE/tls/ca.crt" "$pgdata/"
            chmod 600 "$pgdata/server.key"
            [ "$(id -u)" -ne 0 ] || chown postgres "$pgdata/server.crt" "$pgdata/server.key" "$pgdata/ca.crt"
            # TLS only: no line lets a plain connection in. The role tls_cert logs in
            # with a client certificate signed by the CA (its CN), the others with a
            # password.
            printf '%s\n' \
                'hostssl all tls_cert 127.0.0.1/32 cert' \
                'hostssl all all 127.0.0.1/32 scram-sha-256' \
                'hostssl all all ::1/128 scram-sha-256' >"$pgdata/pg_hba.conf"
        fi
    fi
    local opts="-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=300 -c shared_buffers=256MB"
    if [ "$tls" = tls ]; then
        opts="-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=50 -c ssl=on -c ssl_ca_file=ca.crt"
    fi
    pg_start "$name" "$port" "$opts"
    local exists conn="host=127.0.0.1 port=$port user=$PG_USER dbname=postgres"
    [ "$tls" = tls ] && conn="$conn sslmode=require"
    exists=$(PGPASSWORD=$PG_PASSWORD psql "$conn" -tAc \
        "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'") || die "cannot connect to PostgreSQL ($name) on port $port"
    if [ "$exists" != 1 ]; then
        PGPASSWORD=$PG_PASSWORD psql "$conn" -qc "CREATE DATABASE $PG_DB" >/dev/null
    fi
    if [ "$tls" = tls ]; then
        PGPASSWORD=$PG_PASSWORD psql "${conn/dbname=postgres/dbname=$PG_DB}" -qc "DO \$\$ BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tls_cert') THEN
                CREATE ROLE tls_cert LOGIN;
            END IF; END \$\$; GRANT CREATE ON DATABASE $PG_DB TO tls_cert;
            GRANT CREATE ON SCHEMA public TO tls_cert" >/dev/null \
            || die "cannot prepare the TLS cluster's roles"
    fi
}

# A streaming replica of the main cluster on port $1 (pg_basebackup -R), for the tests
# that hold its replay back with pg_wal_replay_pause() (--max-replica-lag).
pg_replica_up() {
    local port=$1 bin dir=$STATE/pg-replica pgdata=$STATE/pg-replica/data
    bin=$(pg_bindir)
    mkdir -p "$dir"
    [ "$(id -u)" -ne 0 ] || chown postgres "$dir"
    if [ ! -f "$pgdata/PG_VERSION" ]; then
        say "copying the main cluster into a streaming replica in $pgdata"
        as_pg env PGPASSWORD="$PG_PASSWORD" "$bin/pg_basebackup" -h 127.0.0.1 -p "$PG_PORT" \
            -U "$PG_USER" -D "$pgdata" -R -X stream >"$dir/basebackup.log" 2>&1 \
            || { rm -rf "$pgdata"; die "pg_basebackup failed, see $dir/basebackup.log"; }
    fi
    # A hot standby needs max_connections at least the primary's.
    local opts="-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=300 -c wal_receiver_status_interval=1s"
    pg_start pg-replica "$port" "$opts"
    # A replica left paused by a test that was killed replays again.
    PGPASSWORD=$PG_PASSWORD psql "host=127.0.0.1 port=$port user=$PG_USER dbname=postgres" \
        -qAtc "SELECT pg_wal_replay_resume()" >/dev/null \
        || die "cannot connect to the PostgreSQL replica on port $port"
}

pg_down() {
    local name=$1 bin pgdata=$STATE/$1/data
    [ -f "$pgdata/PG_VERSION" ] || return 0
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$bin" ] || return 0
    if as_pg "$bin/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; then
        as_pg "$bin/pg_ctl" -D "$pgdata" -m fast -w stop >/dev/null && say "PostgreSQL ($name) stopped"
    fi
}

# ---------------------------------------------------------------- Garage

garage_bin() {
    local cached=$CACHE/garage-$GARAGE_VERSION/bin/garage
    if [ ! -x "$cached" ]; then
        command -v cargo >/dev/null || die "cargo not found: it is needed once to build Garage"
        say "building Garage $GARAGE_VERSION once into $CACHE (about 12 minutes on 2 cores)"
        # The log lives in the cache directory, which a fresh machine does not have yet.
        mkdir -p "$CACHE"
        cargo install garage --version "$GARAGE_VERSION" --locked --root "$CACHE/garage-$GARAGE_VERSION" \
            >"$CACHE/garage-build.log" 2>&1 || { die "building Garage failed, see $CACHE/garage-build.log"; }
    fi
    mkdir -p "$TOOLS/bin"
    ln -sf "$cached" "$TOOLS/bin/garage"
    echo "$TOOLS/bin/garage"
}

# One Garage instance: $1 = name, $2 = S3 port (rpc +1, admin +3), $3 = metadata engine
# (sqlite unless given).
garage_conf() {
    local name=$1 port=$2 engine=${3:-sqlite} dir=$STATE/$1
    mkdir -p "$dir/meta" "$dir/data"
    if [ ! -f "$dir/rpc_secret" ]; then
        od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$dir/rpc_secret"
        od -An -tx1 -N24 /dev/urandom | tr -d ' \n' >"$dir/admin_token"
    fi
    cat >"$dir/garage.toml" <<EOF
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "$engine"
metadata_fsync = false
data_fsync = false
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$((port + 1))"
rpc_public_addr = "127.0.0.1:$((port + 1))"
rpc_secret = "$(cat "$dir/rpc_secret")"

[s3_api]
s3_region = "$REGION"
api_bind_addr = "127.0.0.1:$port"
root_domain = ".s3.$name.localhost"

[admin]
api_bind_addr = "127.0.0.1:$((port + 3))"
admin_token = "$(cat "$dir/admin_token")"
EOF
    echo "$dir/garage.toml"
}

# A key pair stored once per instance so `env` is stable across restarts.
# Garage key ids are "GK" + 24 hex digits, secrets 64 hex digits.
key_file() {
    local f=$STATE/$1/key-$2.env
    if [ ! -f "$f" ]; then
        echo "KEY_ID=GK$(od -An -tx1 -N12 /dev/urandom | tr -d ' \n')" >"$f"
        echo "KEY_SECRET=$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" >>"$f"
    fi
    echo "$f"
}

garage_up() {
    local name=$1 port=$2 engine=${3:-sqlite} bin conf dir=$STATE/$1
    bin=$(garage_bin)
    conf=$(garage_conf "$name" "$port" "$engine")
    if pid_alive "$dir/pid"; then
        say "Garage '$name' already running on 127.0.0.1:$port"
    else
        for p in "$port" $((port + 1)) $((port + 3)); do
            port_open "$p" && die "port $p is taken by another process; stop it or set RELOCATOR_S3_PORT"
        done
        nohup "$bin" -c "$conf" server >"$dir/server.log" 2>&1 &
        echo $! >"$dir/pid"
        local i
        for i in $(seq 1 100); do
            port_open "$port" && break
            pid_alive "$dir/pid" || die "Garage '$name' exited at start, see $dir/server.log"
            sleep 0.1
        done
        port_open "$port" || die "Garage '$name' did not open port $port, see $dir/server.log"
        say "Garage '$name' started on 127.0.0.1:$port"
    fi
    local g=("$bin" -c "$conf")
    # Layout: a single node holding everything. Applied once.
    if ! "${g[@]}" layout show 2>/dev/null | grep -q 'Current cluster layout version: [1-9]'; then
        local node
        node=$("${g[@]}" node id -q 2>/dev/null | cut -d@ -f1)
        [ -n "$node" ] || die "cannot read Garage node id, see $dir/server.log"
        "${g[@]}" layout assign -z local -c 1G "$node" >/dev/null
        "${g[@]}" layout apply --version 1 >/dev/null
    fi
    # Keys: "main" may create buckets and owns the demo buckets; "readonly" may only read
    # (preflight's permission checks are tested with it); "job" may read and write but not
    # administer them: Garage's nearest match to the README's IAM policy (the whole job is
    # tested with it).
    local kname kf
    for kname in main readonly job; do
        kf=$(key_file "$name" "$kname")
        # shellcheck disable=SC1090
        . "$kf"
        if ! "${g[@]}" key info "$KEY_ID" >/dev/null 2>&1; then
            "${g[@]}" key import --yes -n "relocator-$kname" "$KEY_ID" "$KEY_SECRET" >/dev/null
        fi
    done
    . "$(key_file "$name" main)"
    "${g[@]}" key allow --create-bucket "$KEY_ID" >/dev/null
    local ro_id job_id
    ro_id=$(. "$(key_file "$name" readonly)"; echo "$KEY_ID")
    job_id=$(. "$(key_file "$name" job)"; echo "$KEY_ID")
    local b
    for b in "${BUCKETS[@]}"; do
        "${g[@]}" bucket info "$b" >/dev/null 2>&1 || "${g[@]}" bucket create "$b" >/dev/null
        "${g[@]}" bucket allow --read --write --owner "$b" --key "$KEY_ID" >/dev/null
        "${g[@]}" bucket allow --read "$b" --key "$ro_id" >/dev/null
        "${g[@]}" bucket allow --read --write "$b" --key "$job_id" >/dev/null
    done
}

# ---------------------------------------------------------------- moto

# moto's S3 server, a second S3 implementation (it has versioning, which Garage lacks),
# from PyPI into the tools' virtualenv under the cache directory, pinned, with what the
# Django round trip needs (tests/django). Any access key works on moto.
MOTO_VERSION=5.2.5
TOOLS_PACKAGES=("moto[server]==$MOTO_VERSION" "django==5.2.19" "django-storages[s3]==1.14.6"
    "psycopg[binary]==3.3.9")
MOTO_PORT=$((S3_PORT + 20))
TOOLS_VENV=${RELOCATOR_TOOLS_VENV:-$CACHE/tools-$(echo "${TOOLS_PACKAGES[*]}" | cksum | cut -d' ' -f1)}

moto_up() {
    local dir=$STATE/moto
    mkdir -p "$dir"
    if [ ! -f "$TOOLS_VENV/installed" ]; then
        if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
            say "python3 with venv not found; installing Debian's python3-venv package"
            local sudo=""
            [ "$(id -u)" -eq 0 ] || sudo="sudo"
            DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >&2 \
                || die "apt-get install python3-venv failed; install it by hand, then rerun"
        fi
        say "installing ${TOOLS_PACKAGES[*]} into $TOOLS_VENV (once)"
        mkdir -p "$CACHE"
        rm -rf "$TOOLS_VENV"
        { python3 -m venv "$TOOLS_VENV" \
            && "$TOOLS_VENV/bin/pip" install -q "${TOOLS_PACKAGES[@]}" \
            && touch "$TOOLS_VENV/installed"; } >"$CACHE/tools-install.log" 2>&1 \
            || { rm -rf "$TOOLS_VENV"; die "installing the tools failed, see $CACHE/tools-install.log"; }
    fi
    if pid_alive "$dir/pid"; then
        say "moto already running on 127.0.0.1:$MOTO_PORT"
    else
        port_open "$MOTO_PORT" && die "port $MOTO_PORT is taken by another process; stop it or set RELOCATOR_S3_PORT"
        nohup "$TOOLS_VENV/bin/moto_server" -H 127.0.0.1 -p "$MOTO_PORT" >"$dir/server.log" 2>&1 &
        echo $! >"$dir/pid"
        local i
        for i in $(seq 1 100); do
            port_open "$MOTO_PORT" && break
            pid_alive "$dir/pid" || die "moto exited at start, see $dir/server.log"
            sleep 0.1
        done
        port_open "$MOTO_PORT" || die "moto did not open port $MOTO_PORT, see $dir/server.log"
        say "moto started on 127.0.0.1:$MOTO_PORT"
    fi
    # moto keeps everything in memory: the buckets are made at every start.
    "$TOOLS_VENV/bin/python" - "$MOTO_PORT" "${BUCKETS[@]}" <<'PY' || die "cannot create moto's buckets"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}", region_name="us-east-1",
                  aws_access_key_id="moto", aws_secret_access_key="moto-secret")
have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
for b in sys.argv[2:]:
    if b not in have:
        s3.create_bucket(Bucket=b)
PY
}

# Rails 6.1 (Active Storage, the AWS SDK for Ruby, the pg driver), from Debian, for the
# Rails round trip (tests/rails): once per machine, nothing to start.
RAILS_PACKAGES=(ruby ruby-activestorage ruby-aws-sdk-s3 ruby-pg)

rails_tools() {
    ruby -e 'require "active_storage"; require "aws-sdk-s3"; require "pg"' 2>/dev/null && return
    say "Rails' Active Storage not found; installing Debian's ${RAILS_PACKAGES[*]} (once)"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    if [ -n "$sudo" ] && ! command -v sudo >/dev/null; then
        die "cannot install ${RAILS_PACKAGES[*]}: not root and no sudo. Install them, then rerun."
    fi
    { DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${RAILS_PACKAGES[@]}" \
        || { $sudo apt-get update -qq \
            && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${RAILS_PACKAGES[@]}"; }; } >&2 \
        || die "apt-get install ${RAILS_PACKAGES[*]} failed; install them by hand, then rerun"
}

moto_down() {
    local dir=$STATE/moto
    if pid_alive "$dir/pid"; then
        kill "$(cat "$dir/pid")"
        say "moto stopped"
    fi
    rm -f "$dir/pid"
}

garage_down() {
    local name=$1 dir=$STATE/$1
    if pid_alive "$dir/pid"; then
        kill "$(cat "$dir/pid")"
        local i
        for i in $(seq 1 50); do pid_alive "$dir/pid" || break; sleep 0.1; done
        pid_alive "$dir/pid" && kill -9 "$(cat "$dir/pid")"
        say "Garage '$name' stopped"
    fi
    rm -f "$dir/pid"
}

# ---------------------------------------------------------------- commands

print_env() {
    [ -f "$STATE/garage/key-main.env" ] || die "the stack was never started: run scripts/stack.sh up"
    local main ro job
    main=$(. "$STATE/garage/key-main.env"; echo "$KEY_ID $KEY_SECRET")
    ro=$(. "$STATE/garage/key-readonly.env"; echo "$KEY_ID $KEY_SECRET")
    job=$(. "$STATE/garage/key-job.env" 2>/dev/null; echo "${KEY_ID:-} ${KEY_SECRET:-}")
    cat <<EOF
export DATABASE_URL='postgres://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB'
export AWS_ENDPOINT_URL='http://127.0.0.1:$S3_PORT'
export AWS_ACCESS_KEY_ID='${main% *}'
export AWS_SECRET_ACCESS_KEY='${main#* }'
export AWS_REGION='$REGION'
export RELOCATOR_TEST_READONLY_KEY_ID='${ro% *}'
export RELOCATOR_TEST_READONLY_SECRET='${ro#* }'
export RELOCATOR_TEST_JOB_KEY_ID='${job% *}'
export RELOCATOR_TEST_JOB_SECRET='${job#* }'
export RELOCATOR_TEST_TLS_PORT='$((PG_PORT + 1))'
export RELOCATOR_TEST_TLS_DIR='$STATE/tls'
export RELOCATOR_TEST_REPLICA_PORT='$((PG_PORT + 2))'
export RELOCATOR_TEST_MOTO_ENDPOINT='http://127.0.0.1:$MOTO_PORT'
export RELOCATOR_TOOLS_PYTHON='$TOOLS_VENV/bin/python'
unset AWS_CA_BUNDLE
EOF
    garage_env garage-lmdb $((S3_PORT + 30)) RELOCATOR_BENCH_LMDB
    garage_env garage2 $((S3_PORT + 10)) RELOCATOR_TEST_SECOND
}

# The endpoint and main key of a further Garage, once it was started: $1 = name, $2 = S3
# port, $3 = the variables' prefix.
garage_env() {
    [ -f "$STATE/$1/key-main.env" ] || return 0
    local key
    key=$(. "$STATE/$1/key-main.env"; echo "$KEY_ID $KEY_SECRET")
    cat <<EOF
export $3_ENDPOINT='http://127.0.0.1:$2'
export $3_KEY_ID='${key% *}'
export $3_SECRET='${key#* }'
EOF
}

status() {
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    local name port=$PG_PORT
    for name in pg pg-tls pg-replica; do
        if [ -n "$bin" ] && [ -f "$STATE/$name/data/PG_VERSION" ] \
            && as_pg "$bin/pg_ctl" -D "$STATE/$name/data" status >/dev/null 2>&1; then
            echo "postgres ($name): running on 127.0.0.1:$port"
        else
            echo "postgres ($name): stopped"
        fi
        port=$((port + 1))
    done
    local n
    for n in garage garage2 garage-lmdb moto; do
        if pid_alive "$STATE/$n/pid"; then echo "$n: running"; else echo "$n: stopped"; fi
    done
}

cmd=${1:-}
case "$cmd" in
    up)
        mkdir -p "$STATE"
        pg_up pg "$PG_PORT"
        # A second cluster that accepts TLS connections only (certificates from a
        # throwaway CA), for the sslmode/sslrootcert tests.
        pg_up pg-tls $((PG_PORT + 1)) tls
        pg_replica_up $((PG_PORT + 2))
        garage_up garage "$S3_PORT"
        # A second, independent S3 endpoint with its own keys, for cross-endpoint moves.
        garage_up garage2 $((S3_PORT + 10))
        # A second S3 implementation, with versioning.
        moto_up
        rails_tools
        say "ready: eval \"\$(scripts/stack.sh env)\""
        ;;
    lmdb-up) garage_up garage-lmdb $((S3_PORT + 30)) lmdb ;;
    down)
        moto_down
        garage_down garage-lmdb
        garage_down garage2
        garage_down garage
        pg_down pg-replica
        pg_down pg-tls
        pg_down pg
        ;;
    env) print_env ;;
    status) status ;;
    pg-restart)
        bin=$(pg_bindir)
        as_pg "$bin/pg_ctl" -D "$STATE/pg/data" -l "$STATE/pg/server.log" -m fast -w -t 60 restart \
            >/dev/null || die "PostgreSQL did not restart, see $STATE/pg/server.log"
        say "PostgreSQL restarted"
        ;;
    garage-path) echo "$CACHE/garage-$GARAGE_VERSION/bin/garage" ;;
    tools-path | moto-path) echo "$TOOLS_VENV" ;;
    reset)
        "$0" down
        rm -rf "$STATE"
        say "state removed"
        ;;
    *)
        echo "usage: scripts/stack.sh up|lmdb-up|down|env|status|reset|pg-restart|garage-path|tools-path" >&2
        exit 2
        ;;
esac
