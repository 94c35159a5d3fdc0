# alignflow in a container: a venv with torch and alignflow installed from its wheel, the shipped pipelines inside.
# scripts/build_image.sh builds it with podman (and, where no registry image can be pulled, a Debian base from
# Debian's packages) and runs a tiny pipeline in it; README "In a container" gives the commands:
#   podman build --network host --build-arg BASE=localhost/debian-py:bookworm -t alignflow:cpu .
#   podman run --rm --network host -v "$PWD/work:/work" alignflow:cpu run quickstart     (docker: the same arguments)
# TORCH_SPEC / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS choose torch's build: the script takes the CPU build from a local
# folder of wheels or PyTorch's CPU index. GPU variant: BASE built FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 with
# python3-venv, TORCH_SPEC=torch (PyPI's CUDA build), run with --gpus all (docker) or --device nvidia.com/gpu=all.
# Remote tracking: -e MLFLOW_TRACKING_URI=http://mlflow:5000 (settings.tracking_uri: null reads it) and
# -e PREFECT_API_URL=http://prefect:4200/api (flow runs report to that server instead of a temporary one).
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH_SPEC="torch==2.13.0"
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS=""
# a CA bundle for a proxy that re-signs TLS (mounted at build time, not kept in the image)
ARG PIP_CERT=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
# A venv of its own: Debian's Python is externally managed (PEP 668) and pip refuses to install into it
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# pip's cache lives in a build cache mount, not in a layer
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install ${PIP_CERT:+--cert "$PIP_CERT"} ${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"} \
      ${PIP_EXTRA_INDEX_URL:+--extra-index-url "$PIP_EXTRA_INDEX_URL"} "${TORCH_SPEC}"
# alignflow's dependencies, as pyproject.toml lists them, in a layer of their own: a change to the sources
# rebuilds only the layer below (seconds), not this one (minutes)
COPY pyproject.toml /opt/alignflow/
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -c "import tomllib; print(*tomllib.load(open('/opt/alignflow/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
      > /opt/requirements.txt \
    && pip install ${PIP_CERT:+--cert "$PIP_CERT"} ${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"} \
      ${PIP_EXTRA_INDEX_URL:+--extra-index-url "$PIP_EXTRA_INDEX_URL"} -r /opt/requirements.txt
COPY README.md pipelines.yaml /opt/alignflow/
COPY alignment /opt/alignflow/alignment
COPY tasks /opt/alignflow/tasks
COPY flows /opt/alignflow/flows
# flows/pipelines.yaml is a link to ../pipelines.yaml in the checkout; the wheel holds the file itself. The
# sources go once the wheel is installed: what runs is the installed package, as for a user's pip install.
# --no-deps: the layer above installed them; `pip check` fails the build if pyproject.toml and it disagree.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install ${PIP_CERT:+--cert "$PIP_CERT"} ${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"} \
      ${PIP_EXTRA_INDEX_URL:+--extra-index-url "$PIP_EXTRA_INDEX_URL"} --no-deps /opt/alignflow \
    && pip check && rm -rf /opt/alignflow /opt/requirements.txt && alignflow validate >/dev/null
WORKDIR /work
ENTRYPOINT ["alignflow"]
CMD ["run", "quickstart"]
