#!/usr/bin/env bash
# build-fio-libiscsi.sh -- Debian bookworm's fio 3.33 has the `nbd` engine but NOT `libiscsi`.
# Rebuild the same fio from the Debian source package with libiscsi enabled.
# Installs to PREFIX (default /opt/fio-libiscsi); a benchmark picks up
# PREFIX/bin/fio automatically when it is at the default place (else set FIO=...).
# Uses only apt (deb-src entry is added for bookworm main). ~1 min on 2 cores.
# perf/run.py runs this copy of ../shared/tools/build-fio-libiscsi.sh when PREFIX/bin/fio is missing.
set -euo pipefail
PREFIX=${PREFIX:-/opt/fio-libiscsi}
WORK=${WORK:-/var/tmp/fio-src}
SRC_LIST=/etc/apt/sources.list.d/debian-src.sources
if [ ! -f "$SRC_LIST" ]; then
  cat >"$SRC_LIST" <<'EOS'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOS
fi
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=900 \
  build-essential pkg-config dpkg-dev libiscsi-dev libnbd-dev libaio-dev zlib1g-dev
mkdir -p "$WORK" && cd "$WORK"
[ -d fio-3.33 ] || apt-get source fio
cd fio-3.33
./configure --prefix="$PREFIX" --enable-libiscsi --enable-libnbd | grep -iE 'iscsi|nbd'
make -j"$(nproc)" >/dev/null
make install >/dev/null
"$PREFIX/bin/fio" --enghelp | grep -qw libiscsi && echo "OK: $PREFIX/bin/fio has libiscsi + nbd"
