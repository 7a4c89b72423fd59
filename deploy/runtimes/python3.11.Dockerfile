# Base image of python3.11 functions on the kubernetes backend:
#   $LAMBDABUS_REGISTRY/lambdabus-runtime-python3.11
# Build it from the repository root:
#   docker build -f deploy/runtimes/python3.11.Dockerfile -t "$LAMBDABUS_REGISTRY/lambdabus-runtime-python3.11" .
# The builder generates each function's Dockerfile FROM it (services/builder kubeplan.py): the
# function's requirements go to /function/.deps, its code to /function, and the image runs
# `python3 -m lambdabus_runtime` (stdlib only, from /opt/lambdabus) as an unprivileged user.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PYTHONPATH=/opt/lambdabus
COPY libs/runtime/src/lambdabus_runtime /opt/lambdabus/lambdabus_runtime
RUN python3 -m compileall -q /opt/lambdabus && mkdir -p /function
WORKDIR /function
