# One image for every PMGD service (docker-compose.yml picks the command: pmgd api,
# pmgd broadcaster, pmgd node, pmgd evaluator).
#
# TORCH_SPEC picks the torch build, installed before the package so that pip keeps it:
# the default is the CPU wheel (small image); for the GPU override build a CUDA one, e.g.
#   PMGD_TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu126" docker compose build
FROM python:3.12-slim

ARG TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLCONFIGDIR=/tmp/matplotlib

# Torch first: the largest layer, and it only changes with TORCH_SPEC.
RUN pip install ${TORCH_SPEC}

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pmgd_node ./pmgd_node
COPY services ./services
RUN pip install . && pmgd --help > /dev/null

# An unprivileged user owns the directories the named volumes mount over (a fresh named
# volume takes the ownership of the image directory it covers). /keys stays empty here: the
# cluster's keys live in a volume (docker-compose.yml), never in the image.
RUN useradd --system --uid 10001 --home-dir /var/lib/pmgd --shell /usr/sbin/nologin pmgd \
 && mkdir -p /var/lib/pmgd /state /data /keys \
 && chown pmgd:pmgd /var/lib/pmgd /state /keys
USER pmgd
WORKDIR /var/lib/pmgd

CMD ["pmgd", "--help"]
