#!/usr/bin/env bash
# Make sure a PostgreSQL server listens on 127.0.0.1:5432 and lets user `postgres` in without a
# password (trust), as the PostgreSQL tests expect. Works on a machine that already runs one
# (then it changes nothing), on one with Debian's package but no running cluster, and on one
# without the package (it installs `postgresql` from Debian). Needs root for the last two.
set -euo pipefail

PORT="${COWORKER_PG_PORT:-5432}"

can_connect() {
  psql "postgresql://postgres@127.0.0.1:${PORT}/postgres?connect_timeout=3" -qtAc 'SELECT 1' \
    >/dev/null 2>&1
}

if command -v psql >/dev/null 2>&1 && can_connect; then
  echo "postgres: already serving on 127.0.0.1:${PORT}"
  exit 0
fi

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || ! command -v pg_ctlcluster >/dev/null 2>&1; then
  echo "postgres: installing Debian's postgresql package"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
fi

VERSION="$(ls /usr/lib/postgresql | sort -V | tail -1)"
CLUSTER=main
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "${VERSION} ${CLUSTER}"; then
  echo "postgres: creating cluster ${VERSION}/${CLUSTER} on port ${PORT}"
  pg_createcluster -p "${PORT}" "${VERSION}" "${CLUSTER}" -- --auth-local=trust --auth-host=trust >/dev/null
fi

CONF_DIR="/etc/postgresql/${VERSION}/${CLUSTER}"
# Trust for local connections only (unix socket and loopback), as the tests need.
HBA="${CONF_DIR}/pg_hba.conf"
if ! grep -q '^# coworker-otel test server' "${HBA}" 2>/dev/null; then
  [ -f "${HBA}" ] && cp "${HBA}" "${HBA}.before-coworker"
  cat > "${HBA}" <<'HBA'
# coworker-otel test server: trust for local connections only
local   all          all                     trust
host    all          all     127.0.0.1/32    trust
host    all          all     ::1/128         trust
local   replication  all                     trust
host    replication  all     127.0.0.1/32    trust
HBA
  chown postgres:postgres "${HBA}" 2>/dev/null || true
fi
pg_conftool -s "${VERSION}" "${CLUSTER}" set port "${PORT}" >/dev/null 2>&1 || true
pg_conftool -s "${VERSION}" "${CLUSTER}" set listen_addresses localhost >/dev/null 2>&1 || true

if pg_lsclusters -h | awk -v v="${VERSION}" -v c="${CLUSTER}" '$1==v && $2==c {print $4}' | grep -q online; then
  pg_ctlcluster --skip-systemctl-redirect "${VERSION}" "${CLUSTER}" restart
else
  pg_ctlcluster --skip-systemctl-redirect "${VERSION}" "${CLUSTER}" start
fi

for _ in $(seq 1 120); do
  if pg_isready -q -h 127.0.0.1 -p "${PORT}" && can_connect; then
    echo "postgres: ${VERSION}/${CLUSTER} ready on 127.0.0.1:${PORT}"
    exit 0
  fi
  sleep 0.5
done
echo "postgres: the server did not become ready on 127.0.0.1:${PORT}" >&2
tail -n 30 "/var/log/postgresql/postgresql-${VERSION}-${CLUSTER}.log" >&2 || true
exit 1
