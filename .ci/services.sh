# Starts throwaway PostgreSQL and Redis servers on 127.0.0.1 for the tests, and exports their
# URLs. Source it (`. .ci/services.sh`); `.ci/run` does. Installs the servers from Debian's
# packages if they are missing and apt-get is there. Data lives in a fresh temporary folder;
# `services_stop` stops both servers and deletes it (also run on exit by `.ci/run`).
#
#   AXUM_BITS_TEST_POSTGRES_URL  postgres://bits@127.0.0.1:$PG_PORT/bits
#   AXUM_BITS_TEST_REDIS_URL     redis://127.0.0.1:$REDIS_PORT/
#
#   AXUM_BITS_TEST_S3_URL        http://127.0.0.1:$S3_PORT (moto, S3's real 5 MiB minimum part)
#   AXUM_BITS_TEST_S3_SMALL_URL  http://127.0.0.1:$((S3_PORT + 1)) (moto, 4 KiB minimum part)
#   AXUM_BITS_TEST_S3_PID        the first moto's process (the S3 benchmark reads its CPU time)
#
# PG_PORT, REDIS_PORT and S3_PORT default to 55432, 56379 and 55900. moto (an S3 emulation, from
# PyPI) is installed into a virtual environment under ~/.cache/axum-bits the first time, and run
# by .ci/moto_server.py (which makes its conditional writes atomic). Source it from the
# repository's root.

services_install() {
  local missing=()
  compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null || missing+=(postgresql)
  command -v redis-server > /dev/null || missing+=(redis-server)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    if [ "$(id -u)" -eq 0 ]; then
      DEBIAN_FRONTEND=noninteractive apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" > /dev/null
    else
      DEBIAN_FRONTEND=noninteractive sudo apt-get update -qq
      DEBIAN_FRONTEND=noninteractive sudo apt-get install -y -qq "${missing[@]}" > /dev/null
    fi
  fi
}

services_start() {
  local pg_port="${PG_PORT:-55432}" redis_port="${REDIS_PORT:-56379}"
  SERVICES_DIR="$(mktemp -d "${TMPDIR:-/tmp}/axum-bits-services.XXXXXX")"
  export SERVICES_DIR
  chmod 755 "$SERVICES_DIR"

  local pg_bin
  pg_bin="$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n 1)")"
  # PostgreSQL refuses to run as root: run it as the `postgres` user the package created.
  local as=()
  if [ "$(id -u)" -eq 0 ]; then
    as=(runuser -u postgres --)
  fi
  mkdir -p "$SERVICES_DIR/pg"
  [ ${#as[@]} -eq 0 ] || chown postgres "$SERVICES_DIR/pg"
  "${as[@]}" "$pg_bin/initdb" -D "$SERVICES_DIR/pg/data" -U bits -A trust --no-sync > "$SERVICES_DIR/pg/initdb.log"
  "${as[@]}" "$pg_bin/pg_ctl" -D "$SERVICES_DIR/pg/data" -l "$SERVICES_DIR/pg/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $pg_port -k $SERVICES_DIR/pg -c fsync=off -c max_connections=300" \
    start > /dev/null
  "${as[@]}" "$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U bits bits
  export AXUM_BITS_TEST_POSTGRES_URL="postgres://bits@127.0.0.1:$pg_port/bits"

  mkdir -p "$SERVICES_DIR/redis"
  redis-server --bind 127.0.0.1 --port "$redis_port" --dir "$SERVICES_DIR/redis" \
    --save '' --appendonly no --daemonize yes --logfile "$SERVICES_DIR/redis/server.log" \
    --pidfile "$SERVICES_DIR/redis/redis.pid"
  for _ in $(seq 50); do
    redis-cli -p "$redis_port" ping > /dev/null 2>&1 && break
    sleep 0.1
  done
  redis-cli -p "$redis_port" ping > /dev/null
  export AXUM_BITS_TEST_REDIS_URL="redis://127.0.0.1:$redis_port/"

  local s3_port="${S3_PORT:-55900}"
  local venv="${AXUM_BITS_MOTO_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/axum-bits/moto-5.2.5}"
  if [ ! -x "$venv/bin/moto_server" ]; then
    echo "installing moto into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check 'moto[server]==5.2.5'
  fi
  mkdir -p "$SERVICES_DIR/s3"
  local launcher=.ci/moto_server.py
  "$venv/bin/python" "$launcher" 127.0.0.1 "$s3_port" > "$SERVICES_DIR/s3/real.log" 2>&1 &
  echo $! > "$SERVICES_DIR/s3/real.pid"
  S3_UPLOAD_PART_MIN_SIZE=4096 "$venv/bin/python" "$launcher" 127.0.0.1 "$((s3_port + 1))" \
    > "$SERVICES_DIR/s3/small.log" 2>&1 &
  echo $! > "$SERVICES_DIR/s3/small.pid"
  local port
  for port in "$s3_port" "$((s3_port + 1))"; do
    for _ in $(seq 100); do
      python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" \
        > /dev/null 2>&1 && break
      sleep 0.1
    done
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" > /dev/null
  done
  export AXUM_BITS_TEST_S3_URL="http://127.0.0.1:$s3_port"
  export AXUM_BITS_TEST_S3_SMALL_URL="http://127.0.0.1:$((s3_port + 1))"
  AXUM_BITS_TEST_S3_PID="$(cat "$SERVICES_DIR/s3/real.pid")"
  export AXUM_BITS_TEST_S3_PID

  echo "PostgreSQL: $AXUM_BITS_TEST_POSTGRES_URL"
  echo "Redis:      $AXUM_BITS_TEST_REDIS_URL"
  echo "S3 (moto):  $AXUM_BITS_TEST_S3_URL and $AXUM_BITS_TEST_S3_SMALL_URL"
}

services_stop() {
  [ -n "${SERVICES_DIR:-}" ] && [ -d "$SERVICES_DIR" ] || return 0
  local pg_bin
  pg_bin="$(dirname "$(ls /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -n 1)")"
  local as=()
  if [ "$(id -u)" -eq 0 ]; then
    as=(runuser -u postgres --)
  fi
  "${as[@]}" "$pg_bin/pg_ctl" -D "$SERVICES_DIR/pg/data" -m immediate -w stop > /dev/null 2>&1 || true
  local pid
  for pid in "$SERVICES_DIR/redis/redis.pid" "$SERVICES_DIR/s3/real.pid" "$SERVICES_DIR/s3/small.pid"; do
    if [ -f "$pid" ]; then
      kill "$(cat "$pid")" 2> /dev/null || true
    fi
  done
  rm -rf "$SERVICES_DIR"
}

services_install
services_start
