# var-serve: the REST service (`python -m app.serve`) with the embedded demo model, configured by VAR_*
# environment variables (docs/serving.md).
#
#   CPU image (default):  docker build -t var-serve:cpu .
#   CUDA image:           docker build --build-arg TORCH_INDEX=https://pypi.org/simple -t var-serve:cuda .
#
# docker-compose.yml builds the CPU image; docker/compose.gpu.yml the CUDA one. The build needs no BuildKit
# feature, so docker-compose 1.29's own builder works too.

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------------------------------------------------
# base: Python and a C++ compiler. torch.compile (Inductor) compiles the kernels of the compiled variants
# (`compiled`, `autotuned`, `fastest`, and `litevar` where compiled is faster) with g++ at run time, on the CPU and
# for Triton's launchers on CUDA.
FROM python:${PYTHON_VERSION}-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------------------
# deps: the dependencies alone, from pyproject.toml only, so that this layer (torch, GBs) is rebuilt only
# when pyproject.toml changes, never for a change of the code.
FROM base AS deps
# Where torch comes from. The default is PyTorch's CPU-only wheel index; a plain torch from PyPI is the
# CUDA build (several GB), which is what the CUDA image wants (TORCH_INDEX=https://pypi.org/simple, or a
# PyTorch index such as https://download.pytorch.org/whl/cu128 for another CUDA version).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# the pin of pyproject.toml (tests/deploy checks that they agree)
ARG TORCH_VERSION=2.13.0
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml /build/pyproject.toml
# torch first, from TORCH_INDEX; then the other dependencies of pyproject.toml from PyPI (the torch pin
# there is already satisfied, so pip keeps the build installed here)
RUN pip install --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION" \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('/build/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /build/requirements.txt \
    && pip install -r /build/requirements.txt

# ---------------------------------------------------------------------------------------------------------
# app: the package itself (code, playground page, metadata for the version metric), installed into a
# folder of its own; a small layer, rebuilt on every code change.
FROM deps AS app
COPY pyproject.toml README.md /build/
COPY app/ /build/app/
RUN pip install --no-deps --target /opt/var-serve/lib /build

# ---------------------------------------------------------------------------------------------------------
# runtime: the default target.
FROM base AS runtime
# The service's user; its home is the compile cache, the one folder it writes besides /tmp.
RUN useradd --system --uid 10001 --user-group --home-dir /var/cache/var-serve --no-create-home \
        --shell /usr/sbin/nologin var-serve \
    && mkdir -p /var/cache/var-serve /models \
    && chown var-serve:var-serve /var/cache/var-serve
COPY --from=deps /opt/venv /opt/venv
COPY --from=app /opt/var-serve/lib /opt/var-serve/lib
# The embedded demo model, outside /models, so that a volume mounted there (released weights) hides nothing.
COPY model_store/demo/ /opt/var-serve/model_store/demo/
WORKDIR /opt/var-serve
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/var-serve/lib \
    VAR_HOST=0.0.0.0 \
    VAR_PORT=8000 \
    VAR_MODEL_DIR=/opt/var-serve/model_store/demo \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/var-serve/inductor \
    TRITON_CACHE_DIR=/var/cache/var-serve/triton \
    CUDA_CACHE_PATH=/var/cache/var-serve/nv \
    XDG_CACHE_HOME=/var/cache/var-serve
# Inductor's and Triton's caches: keep them in a volume, so that a restart skips the compile (with a read-only
# root file system this and /tmp are the only writable places the service needs).
VOLUME ["/var/cache/var-serve"]
USER 10001:10001
EXPOSE 8000
# liveness: 200 while loading and serving, 503 after a failed load (slim images have no curl)
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('VAR_PORT', '8000'), timeout=4)"]
# Python itself as the main process (exec form, no shell, no make): SIGTERM reaches the server, which stops
# accepting, lets accepted work finish within VAR_DRAIN_GRACE_S, then exits.
CMD ["python", "-m", "app.serve"]
