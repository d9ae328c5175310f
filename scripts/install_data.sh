#!/usr/bin/env bash
# Install Fashion-MNIST from Debian's dataset-fashion-mnist package where that is possible: running as root with
# apt-get available, and the files not there yet. Quiet, and never fails: without the package, dsnet downloads
# the files itself (md5-checked, into ~/.cache/dsnet/data) the first time it needs them.
#   DSNET_NO_APT=1 skips it; DSNET_DEBIAN_FASHION_MNIST overrides the folder checked (tests).
set -uo pipefail
target=${DSNET_DEBIAN_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
[[ -n "${DSNET_NO_APT:-}" ]] && exit 0
[[ -d "$target" ]] && exit 0
command -v apt-get >/dev/null 2>&1 || exit 0
[[ $(id -u) == 0 ]] || exit 0
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; }
# try the package lists as they are first (seconds); refresh them only if that fails
if install || { apt-get update -qq >/dev/null 2>&1 && install; }; then
    echo "Fashion-MNIST installed from Debian (dataset-fashion-mnist) in $target"
else
    echo "note: apt could not install dataset-fashion-mnist; dsnet will download Fashion-MNIST when it first needs it"
fi
exit 0
