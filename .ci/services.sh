#!/usr/bin/env bash
# Start what the tests need besides Python: a PostgreSQL server on loopback (several-worker
# studies) and Debian's Chromium (the report opened in a real headless browser).
# Prints the export line for the PostgreSQL URL on its last line.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
need=()
command -v pg_ctlcluster >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
ver=$(ls /etc/postgresql | sort -V | tail -n 1)
pg_ctlcluster "$ver" main start 2>/dev/null || pg_ctlcluster "$ver" main status >/dev/null
for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 && break; sleep 1; done
psql_admin() { su postgres -c "psql -v ON_ERROR_STOP=1 -qtAc \"$1\""; }
[ "$(psql_admin "SELECT 1 FROM pg_roles WHERE rolname='transferstudy'")" = 1 ] \
  || psql_admin "CREATE ROLE transferstudy LOGIN CREATEDB PASSWORD 'transferstudy'"
[ "$(psql_admin "SELECT 1 FROM pg_database WHERE datname='transferstudy_test'")" = 1 ] \
  || psql_admin "CREATE DATABASE transferstudy_test OWNER transferstudy"
echo "export TRANSFERSTUDY_TEST_POSTGRES_URL=postgresql://transferstudy:transferstudy@127.0.0.1:5432/transferstudy_test"
