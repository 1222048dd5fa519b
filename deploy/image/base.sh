#!/usr/bin/env bash
# Builds a minimal Debian base image from Debian's own packages, for machines that reach a
# Debian mirror but no image registry: mmdebstrap writes the root filesystem as a tarball,
# and buildah turns it into a one-layer image.
#
#   deploy/image/base.sh localhost/turnout-base:bookworm [SUITE] [MIRROR]
#
# Needs root (mmdebstrap's root mode, buildah's local storage). The result stands in for
# docker.io/library/debian:bookworm-slim as the Containerfile's BASE_IMAGE.
set -euo pipefail
name=${1:?usage: base.sh IMAGE [SUITE] [MIRROR]}
suite=${2:-bookworm}
mirror=${3:-http://deb.debian.org/debian}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# minbase: Essential and Priority required, plus apt: what the slim images hold. Docs,
# man pages and locales are left out as the slim images do.
mmdebstrap --variant=minbase --mode=root \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --aptopt='APT::Install-Recommends "false"' \
  --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
  "$suite" "$work/rootfs.tar" \
  "deb $mirror $suite main" \
  "deb $mirror $suite-updates main" \
  "deb ${mirror%/debian}/debian-security $suite-security main"

container=$(buildah from scratch)
trap 'buildah rm "$container" >/dev/null; rm -rf "$work"' EXIT
buildah add "$container" "$work/rootfs.tar" /
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --cmd /bin/bash --os linux --arch "$(dpkg --print-architecture)" \
  --label org.opencontainers.image.description="Debian $suite (minbase, mmdebstrap)" \
  "$container"
buildah commit --rm "$container" "$name" >/dev/null
trap 'rm -rf "$work"' EXIT
echo "built $name"
