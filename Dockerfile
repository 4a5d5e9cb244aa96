# Piggyback GAN pipeline. The torch==2.14.1 wheel from PyPI is the CUDA build (it carries the CUDA
# runtime), so this image runs on GPU hosts (`docker run --gpus all ...`) and on CPU alike.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    DVC_NO_ANALYTICS=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends git=1:2.* make=4.* \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace

# Dependencies first (cached layer), then the code.
COPY pyproject.toml README.md ./
COPY piggyback/__init__.py piggyback/
RUN pip install --no-cache-dir -e .

COPY . .
RUN pip install --no-cache-dir --no-deps -e .

# `dvc repro` needs a git repository (DVC experiments need at least one commit).
CMD ["sh", "-c", "git rev-parse --git-dir >/dev/null 2>&1 || (git init -q && git add -A && git -c user.name=docker -c user.email=docker@localhost commit -qm 'container snapshot'); dvc repro"]
