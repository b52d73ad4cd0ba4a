# shellcheck shell=bash
# packaging/lib.sh: what build-deb and build-rpm share, sourced by both. It builds the
# file tree the package installs (see build-deb's header for why it looks like this):
#
#   /opt/vmtelemetryd/                  a venv on the system's /usr/bin/python3.11 holding
#                                       vmtelemetryd and its locked dependencies, compiled (.pyc)
#   /usr/bin/vmtelemetryd               the command: a launcher into that venv
#   UNITDIR/vmtelemetryd.service        systemd/vmtelemetryd.service
#   /usr/lib/sysusers.d/vmtelemetryd.conf, /usr/lib/tmpfiles.d/vmtelemetryd.conf
#   /etc/vmtelemetryd/vmtelemetryd.env  etc/vmtelemetryd.env (the conffile)
#
# Inputs: this checkout's working tree (pyproject.toml, README.md, vmtelemetryd/, systemd/,
# etc/), packaging/requirements.lock and packaging/build-requirements.lock (exact versions and
# sha256 hashes, from packaging/update-lock), the host's /usr/bin/python3.11 and libvirt
# headers (libvirt-python is compiled here, against the distribution's libvirt), PyPI for
# the hash-checked downloads. Nothing from the caller's Python setup takes part: pyenv,
# virtualenvs and pip.conf are shut out by vmt_clean_env.

VMT_PACKAGING=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VMT_REPO=$(dirname "$VMT_PACKAGING")
VMT_PREFIX=/opt/vmtelemetryd
# The system's interpreter, by its exact version: the venv's compiled modules are cp311.
VMT_PYTHON=/usr/bin/python3.11
VMT_PYVER=3.11

vmt_log() { printf '%s: %s\n' "${VMT_PROG:-packaging}" "$*" >&2; }
vmt_die() {
    vmt_log "error: $*"
    exit 1
}

# Shut out everything of the caller's Python setup (pyenv shims, an active venv, PYTHON*
# variables, pip.conf mirrors and find-links): the package is built from the system's
# Python and PyPI alone. VMT_PIP_INDEX_URL names another index (a mirror of PyPI).
vmt_clean_env() {
    local var
    export PATH=/usr/sbin:/usr/bin:/sbin:/bin
    for var in $(compgen -e); do
        case $var in
            PIP_CERT) ;; # whom to trust on the network (a TLS-inspecting proxy), not what to build
            PYTHON* | PIP_* | PYENV* | VIRTUAL_ENV* | CONDA* | SETUPTOOLS_* | _PYTHON_*) unset "$var" ;;
        esac
    done
    export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
    export PIP_DEFAULT_TIMEOUT=120 PYTHONDONTWRITEBYTECODE=1 PYTHONNOUSERSITE=1
    if [ -n "${VMT_PIP_INDEX_URL:-}" ]; then export PIP_INDEX_URL=$VMT_PIP_INDEX_URL; fi
    export LC_ALL=C.UTF-8 TZ=UTC
    umask 022
}

# vmt_need WHAT=PACKAGE...: install what is missing with apt-get (as root), or say what to
# install (Debian's package names). WHAT is a command, a /path, or py:MODULE of VMT_PYTHON.
vmt_need() {
    local pair what pkg missing=()
    for pair in "$@"; do
        what=${pair%%=*} pkg=${pair#*=}
        case $what in
            /*) [ -e "$what" ] && continue ;;
            py:*) [ -x "$VMT_PYTHON" ] && "$VMT_PYTHON" -c "import ${what#py:}" 2>/dev/null && continue ;;
            *) command -v "$what" >/dev/null && continue ;;
        esac
        [[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ "${VMT_NO_APT:-0}" != 1 ]; then
        vmt_log "installing ${missing[*]}"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    else
        vmt_die "missing build tools; install: ${missing[*]}"
    fi
}

vmt_need_tree_tools() {
    # The interpreter, ensurepip (Debian ships it apart), Python.h and libvirt's headers to
    # compile libvirt-python, the tools that strip it.
    vmt_need "$VMT_PYTHON=python3.11" py:ensurepip=python3.11-venv \
        "/usr/include/python$VMT_PYVER/Python.h=python3.11-dev" /usr/include/libvirt/libvirt.h=libvirt-dev \
        gcc=gcc pkg-config=pkg-config strip=binutils readelf=binutils
}

# Sets VMT_VERSION (from pyproject.toml), SOURCE_DATE_EPOCH (the last commit's time unless
# given: every mtime in the package, and the .pyc files are hash-based) and VMT_MAINTAINER.
vmt_metadata() {
    VMT_VERSION=$("$VMT_PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$VMT_REPO/pyproject.toml")
    [[ $VMT_VERSION =~ ^[0-9][0-9A-Za-z.+~]*$ ]] || vmt_die "unusable version in pyproject.toml: $VMT_VERSION"
    if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
        SOURCE_DATE_EPOCH=$(git -C "$VMT_REPO" log -1 --format=%ct 2>/dev/null || true)
        [ -n "$SOURCE_DATE_EPOCH" ] || SOURCE_DATE_EPOCH=$(stat -c %Y "$VMT_REPO/pyproject.toml")
    fi
    export SOURCE_DATE_EPOCH
    # A fixed default: the last commit's author varies with who committed last.
    VMT_MAINTAINER=${VMT_MAINTAINER:-"vmtelemetryd developers <vmtelemetryd@localhost>"}
}

# vmt_work DIR|"": the scratch directory (made, and removed on exit unless it was given).
vmt_work() {
    if [ -n "${1:-}" ]; then
        VMT_WORK=$(mkdir -p "$1" && cd "$1" && pwd)
        [ -z "$(ls -A "$VMT_WORK")" ] || vmt_die "work directory $VMT_WORK is not empty"
    else
        VMT_WORK=$(mktemp -d "${TMPDIR:-/tmp}/vmtelemetryd-build.XXXXXX")
        # shellcheck disable=SC2064  # expand now: the path is fixed
        trap "rm -rf '$VMT_WORK'" EXIT
    fi
}

# vmt_build_tree ROOT UNITDIR: the installed file tree under ROOT (see the header).
vmt_build_tree() {
    local root=$1 unitdir=$2 work=$VMT_WORK
    local builder=$work/builder venv=$root$VMT_PREFIX pip
    local site=$venv/lib/python$VMT_PYVER/site-packages
    mkdir -p "$root"

    # This checkout's sources, copied: nothing is built inside the working tree.
    mkdir -p "$work/src"
    cp "$VMT_REPO/pyproject.toml" "$VMT_REPO/README.md" "$work/src/"
    tar -C "$VMT_REPO" --exclude=__pycache__ --exclude='*.py[co]' -cf - vmtelemetryd | tar -C "$work/src" -xf -

    # A builder venv with the locked setuptools, which builds the sdists (libvirt-python,
    # sdnotify) and vmtelemetryd itself without build isolation: no unpinned build backend
    # is fetched.
    "$VMT_PYTHON" -m venv "$builder"
    pip=("$builder/bin/python" -m pip)
    "${pip[@]}" install -q --require-hashes --no-deps -r "$VMT_PACKAGING/build-requirements.lock"

    # Every dependency, hash-checked against the lock.
    vmt_log "downloading the locked dependencies"
    "${pip[@]}" download -q --require-hashes --no-deps --no-build-isolation \
        -r "$VMT_PACKAGING/requirements.lock" -d "$work/download"
    mkdir -p "$work/wheels"
    cp "$work"/download/*.whl "$work/wheels/" 2>/dev/null || true
    vmt_log "building wheels: vmtelemetryd and the sdists" \
        "(libvirt-python against libvirt $(pkg-config --modversion libvirt 2>/dev/null || echo '?'))"
    # Unpacked here, not in pip's randomly named directories, and compiled without debug
    # information and with the work directory mapped away: the same inputs give the same
    # bytes (the GNU build-id included) wherever the build runs.
    local sdist sdists=()
    mkdir -p "$work/sdist"
    for sdist in "$work"/download/*.tar.gz; do
        [ -e "$sdist" ] && tar -C "$work/sdist" -xzf "$sdist"
    done
    mapfile -t sdists < <(find "$work/sdist" -mindepth 1 -maxdepth 1 -type d | sort)
    CFLAGS="-g0 -ffile-prefix-map=$work=/build" \
        "${pip[@]}" wheel -q --no-deps --no-build-isolation --use-pep517 --no-cache-dir \
        -w "$work/wheels" "${sdists[@]}" "$work/src"

    # The venv, on the system's interpreter; installed from the wheels alone, so the lock
    # must cover every dependency pyproject.toml names.
    "$VMT_PYTHON" -m venv --without-pip "$venv"
    "${pip[@]}" --python "$venv/bin/python" install -q --no-index --find-links "$work/wheels" \
        --no-compile --only-binary :all: "vmtelemetryd==$VMT_VERSION" ||
        vmt_die "the wheels do not satisfy pyproject.toml's dependencies: run packaging/update-lock"
    "${pip[@]}" --python "$venv/bin/python" check >/dev/null ||
        vmt_die "inconsistent dependencies in the venv: $("${pip[@]}" --python "$venv/bin/python" check)"
    local installed locked
    installed=$("${pip[@]}" --python "$venv/bin/python" list --format=freeze --exclude vmtelemetryd |
        tr 'A-Z_' 'a-z-' | sort)
    locked=$(sed -n 's/^\([A-Za-z0-9._-]*==[^ ]*\).*/\1/p' "$VMT_PACKAGING/requirements.lock" |
        tr 'A-Z_' 'a-z-' | sort)
    [ "$installed" = "$locked" ] || vmt_die "the venv differs from requirements.lock (run packaging/update-lock):
$(diff <(echo "$locked") <(echo "$installed") || true)"

    # Made relocatable to /opt/vmtelemetryd: only the interpreter's links stay in bin/
    # (the activate scripts and console scripts name the build directory), and pyvenv.cfg
    # says what it would say had the venv been made in place.
    find "$venv/bin" -mindepth 1 -not -name python -not -name python3 -not -name "python$VMT_PYVER" -delete
    [ "$(readlink "$venv/bin/python$VMT_PYVER")" = "$VMT_PYTHON" ] ||
        vmt_die "$venv/bin/python$VMT_PYVER does not point to $VMT_PYTHON"
    cat >"$venv/pyvenv.cfg" <<EOF
home = $(dirname "$VMT_PYTHON")
include-system-site-packages = false
version = $("$VMT_PYTHON" -c 'import platform; print(platform.python_version())')
executable = $VMT_PYTHON
command = $VMT_PYTHON -m venv $VMT_PREFIX
EOF
    find "$site" -name direct_url.json -path '*.dist-info/*' -delete
    # The RECORD files list what was just deleted (with hashes of scripts whose #! line
    # named the build directory): those lines go.
    "$VMT_PYTHON" -I - "$site" <<'PY'
import csv
import io
import os
import sys

site = sys.argv[1]
for entry in sorted(os.listdir(site)):
    record = os.path.join(site, entry, "RECORD")
    if not entry.endswith(".dist-info") or not os.path.exists(record):
        continue
    with open(record, newline="") as f:
        rows = list(csv.reader(f))
    kept = [r for r in rows if r and os.path.lexists(os.path.normpath(os.path.join(site, r[0])))]
    if kept != rows:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(kept)
        with open(record, "w", newline="") as f:
            f.write(out.getvalue())
PY

    # Debug information of what was compiled here (libvirt-python) names the build
    # directory; it goes, as dh_strip would take it. The wheels' own libraries carry none.
    local elf
    while IFS= read -r -d '' elf; do
        if readelf -S "$elf" 2>/dev/null | grep -q '\.debug_'; then
            strip --strip-debug "$elf"
        fi
    done < <(vmt_find_elf "$venv" -print0)

    # Compiled once here, hash-checked (reproducible, valid whatever the files' mtimes),
    # with the paths the files will have on the host: the service cannot write .pyc files
    # into /opt (ProtectSystem=strict).
    "$venv/bin/python" -I -m compileall -q -j 1 --invalidation-mode checked-hash \
        -s "$root" -p / "$site" >/dev/null || vmt_die "compileall failed"

    # The command. -I: no PYTHONPATH or user site from the caller's environment.
    install -D -m 0755 /dev/stdin "$root/usr/bin/vmtelemetryd" <<EOF
#!$VMT_PREFIX/bin/python3 -I
# vmtelemetryd: the command, run from the self-contained venv in $VMT_PREFIX.
import sys

from vmtelemetryd.cli import main

sys.exit(main())
EOF
    install -D -m 0644 "$VMT_REPO/systemd/vmtelemetryd.service" "$root$unitdir/vmtelemetryd.service"
    install -D -m 0644 "$VMT_REPO/systemd/vmtelemetryd.sysusers" "$root/usr/lib/sysusers.d/vmtelemetryd.conf"
    install -D -m 0644 "$VMT_REPO/systemd/vmtelemetryd.tmpfiles" "$root/usr/lib/tmpfiles.d/vmtelemetryd.conf"
    # root:root here (the group does not exist when the package is unpacked); the
    # tmpfiles.d entry makes them root:vmtelemetry once systemd-sysusers made the group.
    install -d -m 0750 "$root/etc/vmtelemetryd"
    install -m 0640 "$VMT_REPO/etc/vmtelemetryd.env" "$root/etc/vmtelemetryd/vmtelemetryd.env"

    chmod -R u+rwX,go+rX,go-w "$root/opt" "$root/usr"
    vmt_bundled_licenses "$venv" >"$work/bundled.txt"
}

# What the venv bundles, with each distribution's license as its metadata states it.
vmt_bundled_licenses() {
    "$1/bin/python" -I - <<'EOF'
import importlib.metadata as md

for dist in sorted(md.distributions(), key=lambda d: d.metadata["Name"].lower()):
    meta = dist.metadata
    name = meta["Name"]
    if name == "vmtelemetryd":
        continue
    licence = meta.get("License-Expression") or ""
    text = (meta.get("License") or "").strip()
    if not licence and text and "\n" not in text and len(text) <= 60:
        licence = text
    if not licence:
        classifiers = [c.split(" :: ")[-1] for c in meta.get_all("Classifier") or []
                       if c.startswith("License ::")]
        licence = ", ".join(classifiers) or "see its .dist-info directory"
    print(f"{name} {dist.version}: {licence}")
EOF
}

# vmt_check_tree ROOT: nothing in the tree names the build directory, this checkout or pyenv.
vmt_check_tree() {
    local root=$1 pattern hits
    for pattern in "$VMT_WORK" "$VMT_REPO/" /.pyenv; do
        hits=$(grep -rlF -- "$pattern" "$root" 2>/dev/null | head -5 || true)
        [ -z "$hits" ] || vmt_die "files name $pattern:
$hits"
    done
}

# vmt_find_elf DIR [FIND ACTION]: the shared objects below DIR (name.so, name.so.N...).
vmt_find_elf() {
    local dir=$1
    shift
    find "$dir" -type f \( -name '*.so' -o -name '*.so.[0-9]*' \) "$@"
}

# vmt_clamp ROOT: every mtime is SOURCE_DATE_EPOCH.
vmt_clamp() {
    find "$1" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
}
