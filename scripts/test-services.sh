#!/usr/bin/env bash
# Test services for `make test`: installs (Debian packages) what is missing, starts a throwaway
# PostgreSQL server on loopback for the scale-out tests, and prints its URL on stdout.
# Headless Chromium is installed for the report's browser test. Messages go to stderr.
set -euo pipefail
PGPORT="${NNARENA_PGPORT:-55432}"
PGROOT="${NNARENA_PGROOT:-/tmp/nnarena-pg}"

need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "test-services: need root to apt-get install ${need[*]}" >&2
    exit 1
  fi
  echo "test-services: installing ${need[*]} (Debian packages)" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi

bin="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi; }
if ! "$bin/pg_isready" -q -h 127.0.0.1 -p "$PGPORT"; then
  rm -rf "$PGROOT"
  mkdir -p "$PGROOT"
  [ "$(id -u)" = 0 ] && chown postgres "$PGROOT"
  as_pg "'$bin/initdb' -D '$PGROOT/data' -A trust -U postgres" >/dev/null
  as_pg "'$bin/pg_ctl' -D '$PGROOT/data' -l '$PGROOT/server.log' -w -o \
    '-p $PGPORT -k $PGROOT -c listen_addresses=127.0.0.1 -c max_connections=200' start" >&2
fi
echo "postgresql://postgres@127.0.0.1:$PGPORT/postgres"
