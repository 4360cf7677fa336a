# A hospital's daemon: `fedtune client` (Flower SuperNode + fedtune's ClientApp).
#   docker build -f deploy/docker/client.Dockerfile -t fedtune-client .
# For NVIDIA GPUs: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
# and run with `--gpus all` (compose: the commented `deploy.resources` block).
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN useradd --create-home --uid 10001 fedtune
WORKDIR /opt/fedtune
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" "torch>=2.4,<2.15"
COPY pyproject.toml README.md ./
COPY common common
COPY client client
COPY server server
COPY simulations simulations
RUN pip install --no-cache-dir . && rm -rf /root/.cache
# Mount points owned by the unprivileged user (fresh named volumes inherit it).
RUN mkdir -p /state /certs /certs-public /keys /ca /ledger /node && \
    chown fedtune:fedtune /state /certs /certs-public /keys /ca /ledger /node
USER fedtune
# Fetch the embedded default model (and data) at build time: sites are offline.
ARG PREFETCH="all-MiniLM-L6-v2"
ENV FEDTUNE_CACHE=/home/fedtune/.cache/fedtune
RUN if [ -n "$PREFETCH" ]; then fedtune assets $PREFETCH; fi
ENV FLWR_TELEMETRY_ENABLED=0
# The daemon only dials out to the server's Fleet API; it opens no public port
# (its ClientApp I/O port stays on the container's loopback).
ENTRYPOINT ["fedtune", "client"]
