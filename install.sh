#!/usr/bin/env bash
# Installs what Tarefa needs on a Debian machine: Mosquitto from Debian's
# packages and a .venv with the pinned Python dependencies. Safe to re-run:
# every step checks whether it is already done.
set -euo pipefail
cd "$(dirname "$0")"

say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

apt_updated=0
apt_install() {
    [ "$(id -u)" = 0 ] || die "need root to install Debian packages: $*"
    if [ "$apt_updated" = 0 ]; then
        say "apt-get update"
        # A fresh machine's own apt jobs may hold the lock for a while: wait for it.
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -q \
            || die "apt-get update failed"
        apt_updated=1
    fi
    say "apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q "$@" \
        || die "apt-get install $* failed"
}

missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
# systemd/ is tested with systemd-analyze, systemd-sysusers and systemctl (Debian's systemd package).
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found: Tarefa needs Python 3.11"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || die "$PYTHON is $("$PYTHON" --version 2>&1); Tarefa needs Python >= 3.11"
"$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
    apt_install "${missing[@]}"
else
    say "Debian packages present (mosquitto, systemd, python venv)"
fi
# The Debian package enables a system-wide broker on :1883; Tarefa runs its own
# under supervisord (and tests on free ports), so keep the packaged one off --
# unless this host runs Tarefa under systemd (systemd/install-units.sh), where
# mosquitto.service is the broker.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ] \
        && [ ! -e /etc/systemd/system/tarefa.target ]; then
    systemctl disable --now mosquitto >/dev/null 2>&1 || true
fi

# A .venv that cannot be used is made again: cut off while being created (no
# pip), built on a Python that is gone, or made for another directory (the
# checkout was moved or copied: its scripts would run the old place's code).
venv_problem() {
    [ -e .venv ] || return 1
    [ -x .venv/bin/python ] || { echo "it has no bin/python"; return 0; }
    .venv/bin/python -m pip --version >/dev/null 2>&1 || { echo "its pip does not run"; return 0; }
    head -n 3 .venv/bin/pip 2>/dev/null | grep -qF "$(pwd -P)/.venv/bin/python" \
        || { echo "it was made for another directory"; return 0; }
    return 1
}
if problem=$(venv_problem); then
    say "making .venv again: $problem"
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$PYTHON" -m venv .venv || die "python -m venv failed"
fi
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing pinned dependencies into .venv"
    .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt \
        || die "pip install -r requirements.txt failed"
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e . \
        || die "pip install -e . failed"
    echo "$want" > "$stamp"
else
    say ".venv up to date"
fi
mkdir -p run/log
# The default stack is secured (config/cluster.yaml): admin token, Raft password,
# a local CA with a certificate per daemon, MQTT logins and ACLs. Only what is
# missing is created; nothing is overwritten. Delete a file and re-run to rotate it.
say "creating missing secrets and certificates under run/secrets (tarefa-secrets)"
.venv/bin/tarefa-secrets --config config/cluster.yaml || die "tarefa-secrets failed"
say "done"
