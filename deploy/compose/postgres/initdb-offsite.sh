# Run by the postgres image's entrypoint once, when it initialises an empty
# data directory (mounted into /docker-entrypoint-initdb.d/; the entrypoint
# sources .sh files there). docs/DEPLOY.md, "PostgreSQL".
#
# The role offsite streams with: LOGIN and REPLICATION, nothing else (no
# superuser, no CONNECT privilege needed, no table access). The password comes
# from OFFSITE_PG_PASSWORD (a psql variable, so it is never part of a command
# line) and is stored as a SCRAM-SHA-256 verifier (password_encryption's default).
psql -v ON_ERROR_STOP=1 -v pw="${OFFSITE_PG_PASSWORD:?set OFFSITE_PG_PASSWORD}" \
    --username "${POSTGRES_USER:-postgres}" --dbname postgres <<'SQL'
CREATE ROLE offsite WITH REPLICATION LOGIN PASSWORD :'pw';
SQL

# Replication connections as offsite, with its password, from the networks
# this server is attached to (the compose network: the offsite-postgres
# sidecar). The image's `host all all all` line does not match replication
# connections, so without this line the sidecar is refused.
printf '%s\n' 'host replication offsite samenet scram-sha-256' >>"$PGDATA/pg_hba.conf"
