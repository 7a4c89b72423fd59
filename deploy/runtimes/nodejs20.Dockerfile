# Base image of nodejs20 functions on the kubernetes backend:
#   $LAMBDABUS_REGISTRY/lambdabus-runtime-nodejs20
# Build it from the repository root:
#   docker build -f deploy/runtimes/nodejs20.Dockerfile -t "$LAMBDABUS_REGISTRY/lambdabus-runtime-nodejs20" .
# Node.js 20 for the function and npm for its package.json; python3 for the Lambdabus runtime,
# which serves HTTP and runs the function through its Node server (lambdabus_runtime/node).
FROM node:20-bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*
ENV PYTHONUNBUFFERED=1 PYTHONPATH=/opt/lambdabus NODE_ENV=production
COPY libs/runtime/src/lambdabus_runtime /opt/lambdabus/lambdabus_runtime
RUN python3 -m compileall -q /opt/lambdabus && mkdir -p /function
WORKDIR /function
