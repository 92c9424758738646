# coalmine's container image.
#
#   docker build -t coalmine .
#   docker run -d --name coalmine -p 9300:9300 -v coalmine-state:/var/lib/coalmine \
#       --env-file coalmine.env coalmine
#
# coalmine.env holds COALMINE_CLOUDFLARE_ACCOUNT_ID, the tokens and COALMINE_PROMETHEUS_URL
# (docs/configuration.md); secrets never go into the image. The release runbook
# (policies/runbook.yaml) is the default policy: mount a folder of your own policies over
# /etc/coalmine/policies to replace it. State and the decision journal live in the volume.
#
# tests/deploy/test_image.py runs what this file describes (wheel, virtual environment,
# environment, command, health check) without a container engine; hadolint lints it.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the wheel, installed with its dependencies into a virtual environment --------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY daemon/ daemon/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/coalmine/venv \
    && /opt/coalmine/venv/bin/pip install --no-cache-dir /wheels/coalmine-*.whl

# --- runtime: the virtual environment, the default policy, an unprivileged user ---------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="coalmine" \
      org.opencontainers.image.description="Canary analysis for Cloudflare Workers gradual deployments" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 coalmine \
    && useradd --system --uid 10001 --gid coalmine --no-create-home \
       --home-dir /var/lib/coalmine --shell /usr/sbin/nologin coalmine \
    && install -d -o coalmine -g coalmine -m 0750 /var/lib/coalmine
COPY --from=build /opt/coalmine/venv /opt/coalmine/venv
COPY policies/runbook.yaml /etc/coalmine/policies/runbook.yaml
ENV PATH=/opt/coalmine/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    COALMINE_POLICIES=/etc/coalmine/policies \
    COALMINE_STATE_URL=sqlite:////var/lib/coalmine/coalmine.db \
    COALMINE_LISTEN=0.0.0.0:9300
WORKDIR /var/lib/coalmine
VOLUME ["/var/lib/coalmine"]
USER 10001:10001
EXPOSE 9300
# Liveness from inside the container: the port comes from COALMINE_LISTEN, so overriding it
# keeps the check right. Slim images have no curl; Python's urllib does the job.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('COALMINE_LISTEN', ':9300').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
# `docker run IMAGE check-policy /etc/coalmine/policies/runbook.yaml` and the other
# subcommands work too; the default is the daemon.
ENTRYPOINT ["coalmine"]
CMD ["run"]
