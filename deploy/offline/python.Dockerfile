# Stand-in for python:3.11-slim-bookworm on a machine without an image registry (deploy/offline-images.sh): the
# CPython 3.11 build of the machine that runs the script (its interpreter without site-packages, python.tar, at the
# same prefix, since its libpython is linked there), on a Debian minbase with the libraries the standard library
# links, and a virtual environment at /usr/local/python first on PATH, so `python` and `pip` behave as in the
# official image. (Debian bookworm's own python3.11 is 3.11.2; the pinned tree needs >= 3.11.5.)
# Differs from the official image: another CPython build and prefix (the script prints it); it trusts the CA
# bundle of the machine that built it (ca-certificates.crt), so pip inside a build there reaches PyPI through its
# TLS proxy. A local image: never push it.
ARG BASE
FROM ${BASE}
ARG PYTHON_PREFIX
COPY debian.sources /etc/apt/sources.list.d/debian.sources
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ca-certificates libssl3 \
      libffi8 libsqlite3-0 libbz2-1.0 liblzma5 libreadline8 libncursesw6 libuuid1 libgdbm6 libexpat1 libnsl2 \
      libtirpc3 libcrypt1 zlib1g \
 && rm -rf /var/lib/apt/lists/*
ADD python.tar /
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
# The prefix may sit under a private home (pyenv's /root/.pyenv): the runtime user must reach it.
RUN d="$PYTHON_PREFIX"; while [ "$d" != / ]; do chmod o+x "$d"; d=$(dirname "$d"); done \
 && "$PYTHON_PREFIX/bin/python3.11" -m venv /usr/local/python \
 && /usr/local/python/bin/python -c "import ssl, sqlite3, ctypes, lzma, bz2, uuid, zlib, hashlib, readline"
ENV PATH=/usr/local/python/bin:$PATH \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    LANG=C.UTF-8
CMD ["python3"]
