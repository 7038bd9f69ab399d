# Stand-in for the registry's redis:<version> (scripts/compose-images.sh builds it only
# when that image is missing and cannot be pulled): Debian's redis-server on the local
# Debian image, laid out like the official image (runs as `redis` in /data).
ARG BASE
FROM ${BASE}
ARG VERSION
LABEL org.opencontainers.image.description="session-affinity stand-in for redis:${VERSION}: Debian's redis-server; only for machines without a registry"
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server redis-tools >/dev/null \
 && rm -rf /var/lib/apt/lists/*
RUN redis-server --version | grep -q "v=${VERSION} " \
 || { echo "Debian's redis-server is not ${VERSION}: $(redis-server --version)"; exit 1; }
RUN mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server"]
