# Image for the custody API (`custody serve`) and chain watcher (`custody watch`).
# Config comes only from environment variables (custody/config.py); no secrets in the image.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml ./
# The product's packages only (pyproject.toml [tool.setuptools.packages.find]); the test
# kit (regtest/), tests/ and bench/ stay out (tests/test_packaging.py checks both lists).
COPY pledge ./pledge
COPY pledge_hwi ./pledge_hwi
COPY custody ./custody
COPY hsm ./hsm
# Build wheels here so the runtime stage carries neither sources nor build tools.
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install /wheels/*.whl
# The loan statement's PDF embeds DejaVu Sans, for Russian names (custody/reports/pdf.py).
RUN apt-get update && apt-get install -y --no-install-recommends fonts-dejavu-core \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --user-group --home-dir /nonexistent --shell /usr/sbin/nologin custody
USER custody
WORKDIR /tmp
EXPOSE 8080
CMD ["custody", "serve"]
