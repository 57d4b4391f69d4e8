#!/usr/bin/env bash
# Make sure Fashion-MNIST is available for the demo.  Never fails: without it the demo falls back to
# scikit-learn's digits and says so.
set -u
DIR="${HWQUANT_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
have() { [ -e "$DIR/train-images-idx3-ubyte.gz" ] || [ -e "$DIR/train-images-idx3-ubyte" ]; }
if have; then
  echo "Fashion-MNIST: found in $DIR"
  exit 0
fi
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO="none"; fi
  fi
  if [ "$SUDO" != none ]; then
    echo "Fashion-MNIST: installing Debian package dataset-fashion-mnist ..."
    ($SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "Fashion-MNIST: apt-get install dataset-fashion-mnist failed"
  fi
fi
if have; then
  echo "Fashion-MNIST: installed in $DIR"
else
  echo "Fashion-MNIST: not available (no $DIR, apt unusable); the demo will fall back to scikit-learn digits"
fi
exit 0
