#!/usr/bin/env bash
# Build dist/imagepushd_<version>_all.deb with Debian's own tooling, then run lintian on it.
#
#   packaging/build-deb.sh            (what `make deb` runs; as root on Debian 12)
#   DEB_BUILD_OPTIONS=nocheck packaging/build-deb.sh    skips the build-time unit tests
#   OUTDIR=/some/dir packaging/build-deb.sh             puts the .deb there instead of dist/
#
# The version is __version__ in daemon/imagepushd/__init__.py. The source tree is copied to a
# temporary directory with packaging/debian/ as its debian/, so the work tree is never touched.
# Build dependencies are installed with apt from debian/control's Build-Depends.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
outdir=${OUTDIR:-$here/dist}

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' daemon/imagepushd/__init__.py)
if [ -z "$version" ]; then
    echo "build-deb: no __version__ in daemon/imagepushd/__init__.py" >&2
    exit 1
fi

# Debian's tools and Debian's python3 only: no virtualenv, pyenv shim or PYTHONPATH leaks in.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP VIRTUAL_ENV PIP_REQUIRE_VIRTUALENV || true
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8

apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "build-deb: apt-get install ${missing[*]}"
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# The tools named here; the rest of Build-Depends is satisfied below from debian/control.
apt_install dpkg-dev debhelper dh-python python3-all python3-setuptools \
    pybuild-plugin-pyproject lintian

work=$(mktemp -d /tmp/imagepushd-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
src=$work/imagepushd-$version
mkdir -p "$src"
tar -C "$here" \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.hypothesis \
    --exclude=.pytest_cache --exclude=.mypy_cache --exclude=.ruff_cache \
    -cf - pyproject.toml setup.cfg LICENSE README.md daemon tests packaging |
    tar -C "$src" -xf -
cp -r packaging/debian "$src/debian"

# Build-Depends (with the nocheck profile when DEB_BUILD_OPTIONS says so).
# nocheck in DEB_BUILD_OPTIONS (skip the tests) goes with the nocheck build profile (skip
# their Build-Depends), as Debian's policy recommends.
profiles=()
case " ${DEB_BUILD_OPTIONS:-} " in
    *" nocheck "*)
        profiles=(-P nocheck)
        export DEB_BUILD_PROFILES="${DEB_BUILD_PROFILES:+$DEB_BUILD_PROFILES }nocheck"
        ;;
esac
if ! unmet=$(cd "$src" && dpkg-checkbuilddeps "${profiles[@]}" 2>&1); then
    echo "build-deb: ${unmet#*: }"
    apt-get update -qq
    (cd "$src" && apt-get build-dep -y -qq --no-install-recommends "${profiles[@]}" ./ >/dev/null)
fi

# debian/changelog must carry the package's version: add an entry when __version__ moved on.
changelog_version=$(dpkg-parsechangelog -l "$src/debian/changelog" -S Version)
if [ "$changelog_version" != "$version" ]; then
    echo "build-deb: debian/changelog says $changelog_version, __version__ is $version: adding an entry"
    maintainer=$(dpkg-parsechangelog -l "$src/debian/changelog" -S Maintainer)
    {
        printf 'imagepushd (%s) unstable; urgency=medium\n\n' "$version"
        printf '  * New upstream version %s.\n\n' "$version"
        printf ' -- %s  %s\n\n' "$maintainer" "$(date -R)"
        cat "$here/packaging/debian/changelog"
    } >"$src/debian/changelog"
fi

(cd "$src" && dpkg-buildpackage -us -uc -b)

deb=$work/imagepushd_${version}_all.deb
mkdir -p "$outdir"
cp "$deb" "$outdir/"
echo "build-deb: built $outdir/imagepushd_${version}_all.deb"

echo "build-deb: lintian (E: error, W: warning, I: info, P: pedantic)"
lintian --pedantic --display-info --tag-display-limit 0 "$outdir/imagepushd_${version}_all.deb"
echo "build-deb: lintian found no errors"
