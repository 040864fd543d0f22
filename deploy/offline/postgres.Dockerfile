# Stand-in for postgres:16-bookworm (deploy/offline-images.sh): Debian bookworm's PostgreSQL 15 with an entrypoint
# that honours what docker-compose.yaml uses of the official one: POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB,
# PGDATA=/var/lib/postgresql/data, the scripts in /docker-entrypoint-initdb.d/ run once on an empty data folder,
# port 5432 with password (scram-sha-256) logins from the network, and `pg_isready` on PATH.
# Differs: PostgreSQL 15 instead of 16; no POSTGRES_INITDB_ARGS, *.sql or *.sql.gz init files.
ARG BASE
FROM ${BASE}
COPY debian.sources /etc/apt/sources.list.d/debian.sources
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /docker-entrypoint-initdb.d /var/run/postgresql \
 && chown postgres:postgres /var/run/postgresql
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data \
    LANG=C.UTF-8
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
