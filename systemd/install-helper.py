"""The Python half of install-units.sh (run by it with the .venv's python).

    install-helper.py secrets --root ROOT --config FILE --uid N --gid N [--owner NAME]
        Runs `tarefa-secrets` on the cluster file, then gives every secret
        file and directory the owner and mode the units need. Prints shell
        assignments (broker_host, broker_port, broker_local, mqtt_passwd,
        mqtt_acl) for install-units.sh to eval; messages go to stderr.
    install-helper.py local-units --config FILE
        Prints the units of the daemons whose host is an address of this
        machine (and mosquitto.service when the broker is one).

Exit status 2: the cluster file is invalid (every problem printed);
1: anything else that stops the install (the message says what to do).

Why `secrets` does more than run tarefa-secrets:

- With --root the cluster file still names /etc/tarefa/... : tarefa-secrets
  is then run on a copy whose absolute secret paths are moved under ROOT,
  so staging never touches the real /etc.
- tarefa-secrets makes missing directories root-only (0700) and, with
  --owner, only chowns the files. The daemons run as `tarefa`: every
  directory holding secrets becomes root:tarefa 0750 (tarefa can enter and
  read, not add or rename files), every secret tarefa 0600, certificates
  tarefa 0644. The CA key stays root 0600: no daemon needs it, and a
  daemon that could read it could mint certificates.
- On the second and third host of a multi-host cluster the secrets are
  copied from the first, without the CA key. tarefa-secrets refuses a CA
  certificate without its key, so when every certificate is already there
  it is run without the TLS part; a missing certificate is an error that
  says where to make it.
- A certificate names its daemon's host as it was when it was made; one
  whose host changed in the cluster file since would fail every TLS
  handshake at run time, so it is refused here, naming the files to delete.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import socket
import subprocess
import sys

CODE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, CODE)

import yaml  # noqa: E402
from cryptography import x509  # noqa: E402

from daemons.core.config import Cluster, load_cluster, read_yaml  # noqa: E402
from daemons.core.errors import ConfigError  # noqa: E402
from daemons.core.provision import MOSQUITTO_ACL, MOSQUITTO_PASSWD, Provisioner  # noqa: E402
from daemons.core.security import CLI_CERT  # noqa: E402

ETC_TAREFA = "/etc/tarefa"
# (section path, key) of every path tarefa-secrets writes to.
SECRET_KEYS = ((("security",), "admin_token_file"), (("security",), "raft_password_file"),
               (("security", "tls"), "ca_file"), (("security", "tls"), "cert_dir"),
               (("broker",), "password_dir"))


class Stop(Exception):
    """Refuse to go on; the message says why and what to do."""


def note(message: str) -> None:
    print(f"install-units.sh: {message}", file=sys.stderr)


def load(path: str) -> Cluster:
    try:
        return load_cluster(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"Error: {problem}", file=sys.stderr)
        sys.exit(2)


def is_local(host: str) -> bool:
    try:
        addresses = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    for family, kind, _, _, address in addresses:
        try:
            with socket.socket(family, kind) as sock:
                sock.bind((address[0], 0))
            return True
        except OSError:
            continue
    return False


# -- local-units ---------------------------------------------------------------


def local_units(config: str) -> int:
    cluster = load(config)
    units = [f"tarefa-replica@{r.id}.service" for r in cluster.replicas if is_local(r.host)]
    units += [f"tarefa-portal@{p.id}.service" for p in cluster.portals if is_local(p.host)]
    if cluster.listener is not None and is_local(cluster.listener.host):
        units.append("tarefa-listener.service")
    if is_local(cluster.broker.host):
        units.append("mosquitto.service")
    print("\n".join(units))
    return 0


# -- secrets -------------------------------------------------------------------


def staged_copy(raw: dict, root: str, drop_tls: bool) -> dict:
    """The cluster file's data with absolute secret paths moved under root."""
    data = dict(raw)
    for sections, key in SECRET_KEYS:
        parent = data
        for name in sections:
            child = parent.get(name)
            if not isinstance(child, dict):
                break
            parent[name] = child = dict(child)
            parent = child
        else:
            value = parent.get(key)
            if root and isinstance(value, str) and os.path.isabs(value):
                parent[key] = root + value
    if drop_tls:
        data["security"] = dict(data["security"], tls=None)
    return data


def secret_files(cluster: Cluster) -> list[tuple[str, int, bool]]:
    """(path, mode, owned by tarefa) of every file tarefa-secrets may write."""
    security = cluster.security
    files = [(p, 0o600, True) for p in (security.admin_token_file, security.raft_password_file)
             if p is not None]
    if security.tls is not None:
        files.append((security.tls.ca_file, 0o644, True))
        files.append((os.path.join(os.path.dirname(security.tls.ca_file), "ca.key"), 0o600,
                      False))
        ids = [d for d, _, _ in Provisioner(cluster).daemons()] + [CLI_CERT]
        for daemon_id in ids:
            cert, key = security.tls.cert_pair(daemon_id)
            files += [(cert, 0o644, True), (key, 0o600, True)]
    directory = cluster.broker.password_dir
    if directory is not None:
        logins = [d for d, kind, _ in Provisioner(cluster).daemons()
                  if kind in ("portal", "listener")]
        files += [(os.path.join(directory, name), 0o600, True)
                  for name in (*logins, MOSQUITTO_PASSWD, MOSQUITTO_ACL)]
    return files


def secret_dirs(cluster: Cluster, etc_tarefa: str) -> list[str]:
    """Directories holding secrets, with their parents up to (not including)
    /etc/tarefa, which keeps its own owner and mode."""
    security = cluster.security
    leaves = {os.path.dirname(p) for p in (security.admin_token_file,
                                            security.raft_password_file) if p is not None}
    if security.tls is not None:
        leaves |= {os.path.dirname(security.tls.ca_file), security.tls.cert_dir}
    if cluster.broker.password_dir is not None:
        leaves.add(cluster.broker.password_dir)
    found: set[str] = set()
    for leaf in leaves:
        path = os.path.normpath(leaf)
        while path != etc_tarefa:
            found.add(path)
            parent = os.path.dirname(path)
            if not path.startswith(etc_tarefa + "/") or parent == path:
                break
            path = parent
    return sorted(found, key=lambda p: (p.count("/"), p))


def stale_certificates(cluster: Cluster) -> list[str]:
    tls = cluster.security.tls
    if tls is None:
        return []
    problems = []
    for daemon_id, _, host in Provisioner(cluster).daemons():
        cert_path, key_path = tls.cert_pair(daemon_id)
        if not os.path.exists(cert_path):
            continue
        with open(cert_path, "rb") as handle:
            cert = x509.load_pem_x509_certificate(handle.read())
        try:
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            names = x509.SubjectAlternativeName([])
        try:
            covered = ipaddress.ip_address(host) in names.get_values_for_type(x509.IPAddress)
        except ValueError:
            covered = host in names.get_values_for_type(x509.DNSName)
        if not covered:
            problems.append(f"{cert_path} does not name {host}, the host of {daemon_id} in the "
                            f"cluster file: delete it and {key_path}, re-run install-units.sh, "
                            "and copy the new pair to the other hosts")
    return problems


def secrets(root: str, config: str, uid: int, gid: int, owner: str | None) -> int:
    staged = root + config
    etc_tarefa = root + ETC_TAREFA
    load(staged)  # validate the operator's file first (exit 2 lists every problem)
    with open(staged, encoding="utf-8") as handle:
        # As the daemons read it (found by review: yaml.safe_load read `id: 007`
        # as the number 7, and the rewritten copy then failed the check).
        raw = read_yaml(handle.read())
    temporary = os.path.join(os.path.dirname(staged), f".cluster.secrets.{os.getpid()}.yaml")
    try:
        def write(data: dict) -> str:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                yaml.safe_dump(data, out, sort_keys=False)
            return temporary

        path = write(staged_copy(raw, root, False)) if root else staged
        cluster = load(path)
        tls = cluster.security.tls
        if tls is not None:
            ca_key = os.path.join(os.path.dirname(tls.ca_file), "ca.key")
            if os.path.exists(tls.ca_file) and not os.path.exists(ca_key):
                missing = [p for d, _, _ in Provisioner(cluster).daemons()
                           for p in tls.cert_pair(d) if not os.path.exists(p)]
                if missing:
                    raise Stop(f"{', '.join(missing)} missing and {ca_key} is not on this host "
                               "(it stays on the first host): make them there (delete nothing, "
                               "re-run install-units.sh) and copy them here")
                note(f"{tls.ca_file} without its key (kept on the first host): every "
                     "certificate is present, none is made here")
                path = write(staged_copy(raw, root, True))

        for directory in secret_dirs(cluster, etc_tarefa):
            os.makedirs(directory, mode=0o750, exist_ok=True)
            os.chown(directory, 0, gid)
            os.chmod(directory, 0o750)
        command = [os.path.join(CODE, ".venv", "bin", "tarefa-secrets"), "--config", path]
        if owner is not None:
            command += ["--owner", owner]
        result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, check=False)
        for line in result.stdout.splitlines():
            note(line.replace(temporary, staged))
        if result.returncode != 0:
            raise Stop(f"tarefa-secrets failed (exit {result.returncode}), see above")
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)

    for file_path, mode, tarefa_owned in secret_files(cluster):
        if os.path.exists(file_path):
            os.chown(file_path, uid if tarefa_owned else 0, gid if tarefa_owned else 0)
            os.chmod(file_path, mode)
    problems = stale_certificates(cluster)
    if problems:
        raise Stop("; ".join(problems))

    broker = cluster.broker
    values = {"broker_host": broker.host, "broker_port": str(broker.port),
              "broker_local": "1" if is_local(broker.host) else "0",
              "mqtt_passwd": "", "mqtt_acl": ""}
    if broker.password_dir is not None:
        values["mqtt_passwd"] = os.path.join(broker.password_dir, MOSQUITTO_PASSWD)
        values["mqtt_acl"] = os.path.join(broker.password_dir, MOSQUITTO_ACL)
    for key, value in values.items():
        print(f"{key}={shlex.quote(value)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="install-helper.py")
    commands = parser.add_subparsers(dest="command", required=True)
    secret = commands.add_parser("secrets")
    secret.add_argument("--root", default="")
    secret.add_argument("--config", required=True)
    secret.add_argument("--uid", type=int, required=True)
    secret.add_argument("--gid", type=int, required=True)
    secret.add_argument("--owner")
    local = commands.add_parser("local-units")
    local.add_argument("--config", required=True)
    args = parser.parse_args()
    try:
        if args.command == "secrets":
            return secrets(args.root, args.config, args.uid, args.gid, args.owner)
        return local_units(args.config)
    except Stop as exc:
        print(f"install-units.sh: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"install-units.sh: error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
