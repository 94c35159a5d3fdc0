# CPU image that runs the sandbox quickstart:
#   docker build -t alignflow . && docker run --rm -v $PWD/out:/work alignflow
# GPU variant: build FROM a CUDA runtime image (e.g. nvidia/cuda:12.4.1-runtime-ubuntu22.04 with python3.11)
# and pass --build-arg TORCH_SPEC="torch" so pip installs a CUDA build; run with `docker run --gpus all`.
# Remote tracking: -e MLFLOW_TRACKING_URI=http://mlflow:5000 (settings.tracking_uri: null uses it), and
# -e PREFECT_API_URL=http://prefect:4200/api to report flow runs to a Prefect server instead of a temporary one.
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/alignflow
COPY pyproject.toml README.md ./
COPY alignment ./alignment
COPY tasks ./tasks
COPY flows ./flows
COPY pipelines.yaml ./
# Note: from PyPI, torch on x86-64 is the CUDA build (several GB); point pip at a CPU wheel index with
# --build-arg PIP_EXTRA_INDEX_URL=... for a small CPU image.
ARG PIP_EXTRA_INDEX_URL=""
RUN pip install "${TORCH_SPEC}" && pip install .
WORKDIR /work
ENTRYPOINT ["alignflow"]
CMD ["run", "quickstart"]
