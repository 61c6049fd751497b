# Starts throwaway PostgreSQL and Redis servers on 127.0.0.1 for the tests, and exports their
# URLs. Source it (`. .ci/services.sh`); `.ci/run` does. Installs the servers from Debian's
# packages if they are missing and apt-get is there. Data lives in a fresh temporary folder;
# `services_stop` stops both servers and deletes it (also run on exit by `.ci/run`).
#
#   AXUM_BITS_TEST_POSTGRES_URL  postgres://bits@127.0.0.1:$PG_PORT/bits
#   AXUM_BITS_TEST_REDIS_URL     redis://127.0.0.1:$REDIS_PORT/
#
# PG_PORT and REDIS_PORT default to 55432 and 56379.

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
  echo "PostgreSQL: $AXUM_BITS_TEST_POSTGRES_URL"
  echo "Redis:      $AXUM_BITS_TEST_REDIS_URL"
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
  if [ -f "$SERVICES_DIR/redis/redis.pid" ]; then
    kill "$(cat "$SERVICES_DIR/redis/redis.pid")" 2> /dev/null || true
  fi
  rm -rf "$SERVICES_DIR"
}

services_install
services_start
