# Stand-in for redis:7.2-bookworm (deploy/offline-images.sh): Debian bookworm's Redis 7.0, with the official
# image's `docker-entrypoint.sh` behaviour that docker-compose.yaml uses: run as root, it drops to the `redis` user
# (owning /data, the working folder) and runs the given command; `redis-cli` is on PATH.
# Differs: Redis 7.0.15 instead of 7.2.
ARG BASE
FROM ${BASE}
COPY debian.sources /etc/apt/sources.list.d/debian.sources
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data \
 && printf '#!/bin/sh\nset -e\nif [ "$(id -u)" = 0 ]; then chown -R redis:redis /data; exec runuser -u redis -- "$@"; fi\nexec "$@"\n' \
      > /usr/local/bin/docker-entrypoint.sh && chmod 755 /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
EXPOSE 6379
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
