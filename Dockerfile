# The mp2a edge server: the core package, the online loop's numpy half, the BentoML service
# and one artifact; no torch.
# Same contents as bentofile.yaml (`bentoml build && bentoml containerize mp2a:latest` is the
# other way to get an image). Build the artifact first (`make serve`, or `mp2a adapt ...
# --out runs/default` then `mp2a export runs/default --format onnx`), then:
#
#   docker build -t mp2a .
#   docker run -p 3000:3000 mp2a
#
# GPU: a CUDA base image that has python3 (>= 3.10) with pip, and the GPU ONNX Runtime:
#   docker build -t mp2a-gpu --build-arg BASE_IMAGE=<cuda+cudnn runtime image with python3> \
#       --build-arg ORT_PACKAGE=onnxruntime-gpu .
#   docker run --gpus all -p 3000:3000 mp2a-gpu
#
# Online adaptation: this image only serves (and keeps traffic embeddings in
# RUN/traffic.sqlite). The adaptation worker needs the training stack (torch, open_clip):
# mount RUN as a volume shared with a second container that has `pip install mp2a[train]`
# and runs `python -m online.worker /app/runs/default`; the server hot-swaps what the worker
# publishes. Give this one MP2A_ADMIN_TOKEN to enable POST /adapt and POST /rollback.
#
# An edge site adapted by a hub (no worker here at all): run it as
#   docker run -e MP2A_EDGE_TOKEN=<the site's token> -p 3000:3000 mp2a python3 -m mp2a serve \
#       /app/runs/default --host 0.0.0.0 --port 3000 --hub http://<hub>:3000 --site <site>
# (deploy/docker-compose.yml has one; serving/README.md describes the topology).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG ORT_PACKAGE=onnxruntime
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BENTOML_DO_NOT_TRACK=True \
    BENTOML_HOME=/tmp/bentoml \
    MP2A_RUN=/app/runs/default \
    MP2A_BACKEND=ort

# the pins of bentofile.yaml's python.packages (pyproject: core dependencies + [serve])
RUN python3 -m pip install \
        "numpy>=1.26" "pillow>=10.1" "safetensors>=0.4" \
        "bentoml>=1.4,<1.5" "fastapi>=0.115" "httptools>=0.6" "uvloop>=0.19" \
        "${ORT_PACKAGE}>=1.20" "prometheus-client>=0.20"

RUN useradd --create-home --uid 1000 mp2a
WORKDIR /app
COPY --chown=mp2a:mp2a mp2a/ mp2a/
COPY --chown=mp2a:mp2a online/ online/
COPY --chown=mp2a:mp2a serving/ serving/
COPY --chown=mp2a:mp2a runs/default/ runs/default/
USER mp2a

EXPOSE 3000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
    CMD python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:3000/readyz', timeout=2)"
CMD ["python3", "-m", "bentoml", "serve", "serving.service:Mp2aService", \
     "--host", "0.0.0.0", "--port", "3000"]
