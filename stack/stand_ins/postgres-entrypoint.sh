#!/bin/sh
# The stand-in for the official postgres image's entrypoint (docker-library/postgres), the part infra/compose.yaml
# relies on: POSTGRES_PASSWORD (required), POSTGRES_USER (default postgres) and PGDATA; on the first start of an empty
# data directory, initdb and then every /docker-entrypoint-initdb.d/*.sh (executed if executable, else sourced, with
# the server listening on its socket only); then postgres on every address, passwords required over TCP.
set -eu
: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is required}"
export POSTGRES_USER="${POSTGRES_USER:-postgres}"
PGDATA="${PGDATA:-/var/lib/postgresql/data}"
# The socket beside the data, not in /var/run/postgresql: container engines mount a fresh /run. psql, pg_isready and
# the init scripts find it through PGHOST (the image sets it).
export PGHOST="${PGHOST:-/var/lib/postgresql}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --auth-local=trust --auth-host=scram-sha-256 \
        --pgdata="$PGDATA" >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    pg_ctl --pgdata="$PGDATA" --options="-c listen_addresses='' -c unix_socket_directories=$PGHOST" --wait start >/dev/null
    for script in /docker-entrypoint-initdb.d/*.sh; do
        [ -e "$script" ] || continue
        echo "running $script"
        if [ -x "$script" ]; then "$script"; else . "$script"; fi
    done
    pg_ctl --pgdata="$PGDATA" --mode=fast --wait stop >/dev/null
fi
if [ "${1:-}" = postgres ]; then
    shift
    exec postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories="$PGHOST" "$@"
fi
exec "$@"
