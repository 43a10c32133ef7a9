# ollama-gw in a container: the same command, settings file, user and umask as the
# Debian package's systemd unit (systemd/ollama-gw.service), on Debian's python3.
#
#   docker build -t ollama-gw .            (or: podman build --format docker ...)
#   docker run -d -p 127.0.0.1:8080:8080 -e OLLAMA_URL=http://ollama:11434 \
#       -v ollama-gw-data:/var/lib/ollama-gw --stop-timeout 90 ollama-gw
#
# BASE: any Debian 12 based image; a registry mirror's, or one built locally.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv </dev/null \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY setup.cfg pyproject.toml README.md constraints.txt ./
COPY app app
COPY cli cli
COPY migrations migrations
# Optional: a PyPI mirror, and the CA bundle of a TLS-inspecting proxy (mount the file
# too: `podman build -v /etc/ssl/certs/ca-certificates.crt:/run/ca.crt:ro
# --build-arg PIP_CERT=/run/ca.crt`).
ARG PIP_INDEX_URL
ARG PIP_CERT
# As debian/rules builds the package's virtualenv: the tested versions, bytecode
# compiled now, no test suites, and no pip left to change it later.
RUN python3 -m venv /opt/venvs/ollama-gw \
 && /opt/venvs/ollama-gw/bin/pip install --no-cache-dir --compile -c constraints.txt \
        ${PIP_INDEX_URL:+--index-url "$PIP_INDEX_URL"} ${PIP_CERT:+--cert "$PIP_CERT"} . \
 && find /opt/venvs/ollama-gw/lib -type d -name tests -prune -exec rm -r {} + \
 && /opt/venvs/ollama-gw/bin/python -m pip uninstall --yes --quiet pip setuptools \
 && /opt/venvs/ollama-gw/bin/python -P -m cli config example \
        --set data_dir=/var/lib/ollama-gw >/config.toml

FROM ${BASE}
# python3: the interpreter the virtualenv links to (same base, same path).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 </dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --user-group --home-dir /var/lib/ollama-gw --no-create-home \
        --shell /usr/sbin/nologin ollama-gw \
 && install -d -o ollama-gw -g ollama-gw -m 0750 /var/lib/ollama-gw
COPY --from=build /opt/venvs/ollama-gw /opt/venvs/ollama-gw
COPY --from=build /config.toml /etc/ollama-gw/config.toml
# The package's command: as root (`docker exec -u 0 ... ollama-gw keys add`) it
# switches to ollama-gw, so the database stays writable by the server.
COPY debian/bin/ollama-gw /usr/bin/ollama-gw
# As the unit sets them; a container must listen beyond its own loopback.
ENV OLLAMA_GW_CONFIG=/etc/ollama-gw/config.toml \
    OLLAMA_GW_BIND=0.0.0.0:8080
USER ollama-gw
WORKDIR /var/lib/ollama-gw
VOLUME /var/lib/ollama-gw
EXPOSE 8080
# /health answers 503 when the database is down. Python, because the image has no
# curl; the port follows OLLAMA_GW_BIND.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/venvs/ollama-gw/bin/python", "-c", "import os, urllib.request; port = os.environ.get('OLLAMA_GW_BIND', ':8080').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=4)"]
# SIGTERM drains in-flight streams for graceful_timeout (60 s): give `docker stop`
# more than that (--stop-timeout 90, or stop_grace_period in compose).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/ollama-gw"]
CMD ["serve"]
