#!/usr/bin/env bash
# Sets up a fresh machine: the Debian data packages (offline images, Fashion-MNIST, WordNet) and a virtualenv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PACKAGES="openclipart-png dataset-fashion-mnist wordnet-base fonts-noto-color-emoji unicode-cldr-core chromium"

missing=""
for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  echo "installing Debian packages:$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q -r requirements.txt
touch .venv/.installed
