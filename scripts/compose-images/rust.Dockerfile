# Stand-in for the registry's rust:<version>-slim-<suite> (scripts/compose-images.sh
# builds it only when that image is missing and cannot be pulled): the host's own Rust
# toolchain (rustc, cargo, the host target's std) on the local Debian image with gcc and
# libc6-dev, laid out like the official image (CARGO_HOME=/usr/local/cargo).
#
# Cargo fetches crates from the registry while the chat node's image builds, so that
# build runs with `--network host` here, and cargo trusts the host's CA bundle
# (CARGO_HTTP_CAINFO): the host reaches the registry only through it.
ARG BASE
FROM ${BASE}
ARG VERSION
LABEL org.opencontainers.image.description="session-affinity stand-in for rust:${VERSION}: the host's Rust toolchain; only for machines without a registry"
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ca-certificates gcc libc6-dev >/dev/null \
 && rm -rf /var/lib/apt/lists/*
COPY toolchain /usr/local/rustup/toolchains/host
COPY host-ca-bundle.crt /etc/ssl/certs/host-ca-bundle.crt
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CARGO_HTTP_CAINFO=/etc/ssl/certs/host-ca-bundle.crt
RUN mkdir -p /usr/local/cargo/bin \
 && ln -s /usr/local/rustup/toolchains/host/bin/cargo /usr/local/rustup/toolchains/host/bin/rustc /usr/local/cargo/bin/
RUN rustc --version | grep -q "^rustc ${VERSION%%-*}[. ]" && cargo --version >/dev/null \
 || { echo "the host's toolchain is not Rust ${VERSION%%-*}: $(rustc --version)"; exit 1; }
