# syntax=docker/dockerfile:1
# vqsearch server image. CPU torch by default; for GPU hosts:
#   docker build --build-arg TORCH_VARIANT=cu126 -t vqsearch:gpu .
# With Ray (the compose `ray` profile, deploy/kuberay.yaml): --build-arg WITH_RAY=1
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_VARIANT=cpu
ARG WITH_RAY=0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from the lock file: this layer is rebuilt only when the lock changes.
# With Ray: Ray and Ray Data at the versions constraints.txt pins (every node runs this image).
COPY requirements.lock constraints.txt ./
RUN pip install --extra-index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        -r requirements.lock -c constraints.txt \
    && if [ "$WITH_RAY" = 1 ]; then pip install -c constraints.txt "ray[data]"; fi
COPY pyproject.toml README.md ./
COPY vqsearch ./vqsearch
RUN pip install --no-deps .

FROM python:${PYTHON_VERSION}-slim AS runtime
RUN groupadd --system --gid 10001 vqsearch \
    && useradd --system --uid 10001 --gid vqsearch --home-dir /nonexistent --shell /usr/sbin/nologin vqsearch \
    && mkdir /data && chown vqsearch:vqsearch /data
COPY --from=build /opt/venv /opt/venv
# Settings by environment only; 0.0.0.0 because the container's network is the boundary.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    VQSEARCH_DATA_DIR=/data \
    VQSEARCH_HOST=0.0.0.0 \
    VQSEARCH_PORT=8000 \
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=16 \
    LRU_CACHE_CAPACITY=16
VOLUME ["/data"]
EXPOSE 8000
USER 10001:10001
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["vqsearch"]
CMD ["serve"]
