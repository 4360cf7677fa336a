# The federation server: `fedtune server` (Flower SuperLink) and the operator's CLI.
#   docker build -f deploy/docker/server.Dockerfile -t fedtune-server .
FROM python:3.11-slim
# CPU torch for the server (it aggregates and evaluates adapters); pass
# --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 for a CUDA build.
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
ARG PREFETCH="all-MiniLM-L6-v2 drug-reviews-test"
ENV FEDTUNE_CACHE=/home/fedtune/.cache/fedtune
RUN if [ -n "$PREFETCH" ]; then fedtune assets $PREFETCH; fi
ENV FLWR_TELEMETRY_ENABLED=0 FEDTUNE_HOME=/home/fedtune/.fedtune
# 9092: Fleet API, the only port hospitals need. The Control API stays on the
# container's loopback (fedtune server refuses a public one): operators use
# `docker compose exec` or a container sharing this network namespace.
EXPOSE 9092
ENTRYPOINT ["fedtune"]
CMD ["server", "--certs", "/certs", "--state-dir", "/state", \
     "--fleet-address", "0.0.0.0:9092", "--control-address", "127.0.0.1:9093"]
