# One image for every PMGD service (docker-compose.yml picks the command: pmgd api,
# pmgd broadcaster, pmgd node, pmgd evaluator).
#
# TORCH_SPEC picks the torch build, installed before the package so that pip keeps it:
# the default is the CPU wheel (small image); for the GPU override build a CUDA one, e.g.
#   PMGD_TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu126" docker compose build
#
# BASE picks the base image: any Debian-like image with python3 and its venv module. The
# default is the public python:3.12-slim; where no image can be pulled, make one locally
# (`make test-compose` does: debootstrap bookworm, `docker import`) and pass its name.
# docker/local/ may hold files for a build without a public registry: wheels (found before
# the index, e.g. the CPU torch wheel) and ca.crt (the CA bundle pip should trust). They are
# used in the build stage only and never reach the final image.
ARG BASE=python:3.12-slim

# The sources, gathered in one layer that later stages copy whole: few steps after the big
# installs, since a storage driver without layer sharing (vfs, as on these build machines)
# copies the whole file system at every step.
FROM ${BASE} AS src
WORKDIR /app
COPY pyproject.toml README.md requirements.lock ./
COPY pmgd ./pmgd
COPY pmgd_node ./pmgd_node
COPY services ./services
COPY examples ./examples

FROM ${BASE} AS build
ARG TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_FIND_LINKS=/tmp/local \
    PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY docker/local/ /tmp/local/
# Torch first: the largest layer, and it only changes with TORCH_SPEC (pip then keeps it).
RUN python3 -m venv /opt/venv \
 && if [ -f /tmp/local/ca.crt ]; then export PIP_CERT=/tmp/local/ca.crt; fi \
 && pip install ${TORCH_SPEC}
COPY --from=src /app /app
# The package at the versions CI tested (requirements.lock): a cluster in containers
# computes the same bits as the in-process engine on the host.
RUN if [ -f /tmp/local/ca.crt ]; then export PIP_CERT=/tmp/local/ca.crt; fi \
 && pip install . --constraint requirements.lock && pmgd --help > /dev/null

# A node needs numpy, pyzmq, msgpack and prometheus_client only: no torch, no matplotlib
# (tests/test_imports.py pins that `pmgd node` imports neither).
FROM ${BASE} AS node-build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
COPY docker/local/ /tmp/local/
COPY --from=src /app /app
WORKDIR /app
RUN python3 -m venv /opt/venv \
 && if [ -f /tmp/local/ca.crt ]; then export PIP_CERT=/tmp/local/ca.crt; fi \
 && pip install --no-deps . \
 && pip install numpy pyzmq msgpack prometheus-client --constraint requirements.lock \
 && pmgd node --help > /dev/null

FROM ${BASE} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    PATH=/opt/venv/bin:$PATH
# An unprivileged user owns the directories the named volumes mount over (a fresh named
# volume takes the ownership of the image directory it covers). /keys stays empty here: the
# cluster's keys live in a volume (docker-compose.yml), never in the image.
RUN useradd --system --uid 10001 --home-dir /var/lib/pmgd --shell /usr/sbin/nologin pmgd \
 && mkdir -p /var/lib/pmgd /state /data /keys \
 && chown pmgd:pmgd /var/lib/pmgd /state /keys
USER pmgd
WORKDIR /var/lib/pmgd
CMD ["pmgd", "--help"]

# `--target node`: the parameter node's image (pmgd node alone).
FROM runtime AS node
COPY --from=node-build /opt/venv /opt/venv

# The default: every service (pmgd api, broadcaster, evaluator, node, keys), and the examples
# (the reference chip: python3 /usr/local/share/pmgd/examples/reference_chip.py).
FROM runtime
COPY --from=build /opt/venv /opt/venv
COPY --from=src /app/examples /usr/local/share/pmgd/examples
