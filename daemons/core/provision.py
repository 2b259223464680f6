"""`tarefa-secrets`: create the secrets and certificates a cluster file names.

For every path in the cluster file's `security` and `broker` sections that
does not exist yet it writes a fresh secret (mode 0600):

- the admin bearer token (`security.admin_token_file`);
- the Raft password (`security.raft_password_file`);
- a local CA (`security.tls.ca_file`, its key beside it as ca.key) and a
  certificate pair per daemon id plus `tarefa` for the CLI, valid for
  localhost, 127.0.0.1 and the daemon's host (`security.tls.cert_dir`);
- one MQTT password per portal and listener (`broker.password_dir/<id>`),
  with Mosquitto's password file and an ACL file beside them
  (`mosquitto.passwd`, `mosquitto.acl`): portals may publish and subscribe
  on the cluster's event topics, the listener may only subscribe, nobody
  else may do either.

It never overwrites a secret that exists: re-running is safe and only fills
in what is missing (the Mosquitto files are rewritten from the per-daemon
passwords, so adding a portal to the cluster file and re-running gives it a
login). Delete a file and re-run to rotate it. A certificate pair with a half
missing, or one not signed by the current CA (deleting ca.crt and ca.key
rotates the CA), is issued anew. `cryptography` builds the certificates (the same
package PySyncObj needs for its Raft password).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import ipaddress
import os
import pwd
import secrets
import sys
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from daemons.core import events
from daemons.core.config import Cluster, load_cluster
from daemons.core.errors import ConfigError
from daemons.core.security import CLI_CERT, new_credential

CERT_DAYS = 825
RENEW_DAYS = 30  # a daemon certificate this close to expiry is issued again by a re-run
MOSQUITTO_PASSWD = "mosquitto.passwd"
MOSQUITTO_ACL = "mosquitto.acl"
# Mosquitto 2's password hash: PBKDF2-SHA512, "$7$<iterations>$<salt>$<hash>".
MOSQUITTO_ITERATIONS = 101


class Provisioner:
    def __init__(self, cluster: Cluster, owner: str | None = None) -> None:
        self.cluster = cluster
        self.created: list[str] = []
        self.warnings: list[str] = []  # things the operator must do (printed by main)
        self._uid = self._gid = -1
        if owner is not None:
            try:
                entry = pwd.getpwnam(owner)
            except KeyError:
                raise ConfigError([f"--owner: no user {owner!r}"]) from None
            self._uid, self._gid = entry.pw_uid, entry.pw_gid

    # -- files ---------------------------------------------------------------

    def _write(self, path: str, data: bytes, mode: int = 0o600, replace: bool = False) -> None:
        if os.path.exists(path) and not replace:
            return
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        temporary = f"{path}.tmp{os.getpid()}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.chmod(temporary, mode)
            if self._uid != -1:
                os.chown(temporary, self._uid, self._gid)
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
        self.created.append(path)

    def _secret(self, path: str | None) -> None:
        if path is not None:
            self._write(path, (new_credential() + "\n").encode())

    # -- everything ------------------------------------------------------------

    def run(self) -> list[str]:
        security = self.cluster.security
        if security.auth == "token":
            self._secret(security.admin_token_file)
        self._secret(security.raft_password_file)
        if security.tls is not None:
            self._tls()
        if self.cluster.broker.password_dir is not None:
            self._mqtt(self.cluster.broker.password_dir)
        return self.created

    def daemons(self) -> list[tuple[str, str, str]]:
        """(id, kind, host) of every daemon of the cluster file."""
        found = [(r.id, "replica", r.host) for r in self.cluster.replicas]
        found += [(p.id, "portal", p.host) for p in self.cluster.portals]
        if self.cluster.listener is not None:
            found.append((self.cluster.listener.id, "listener", self.cluster.listener.host))
        return found

    # -- TLS -------------------------------------------------------------------

    def _tls(self) -> None:
        tls = self.cluster.security.tls
        assert tls is not None
        ca_key_path = os.path.join(os.path.dirname(tls.ca_file), "ca.key")
        if os.path.exists(tls.ca_file) != os.path.exists(ca_key_path):
            raise ConfigError([f"{tls.ca_file}: the CA certificate and {ca_key_path} must both "
                               "exist or both be absent; remove the one left to start over"])
        if not os.path.exists(tls.ca_file):
            key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                 f"Tarefa CA ({self.cluster.name})")])
            cert = (self._builder(name, name, key.public_key(), CERT_DAYS * 2)
                    .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                    .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                                 False, False), critical=True)
                    .sign(key, hashes.SHA256()))
            self._write(ca_key_path, _key_pem(key))
            self._write(tls.ca_file, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        with open(ca_key_path, "rb") as handle:
            ca_key = serialization.load_pem_private_key(handle.read(), password=None)
        with open(tls.ca_file, "rb") as handle:
            ca_cert = x509.load_pem_x509_certificate(handle.read())
        if _expires_soon(ca_cert):
            # Not replaced here: every machine of the cluster must get the new one.
            self.warnings.append(
                f"{tls.ca_file} expires on {ca_cert.not_valid_after_utc:%Y-%m-%d}: remove it "
                f"and {ca_key_path}, re-run (every certificate is issued again) and copy "
                "the new files to every machine of the cluster")
        reissued = []
        for daemon_id, _, host in [*self.daemons(), (CLI_CERT, "cli", "127.0.0.1")]:
            cert_path, key_path = tls.cert_pair(daemon_id)
            if os.path.exists(key_path) and _still_good(cert_path, ca_cert):
                continue
            if os.path.exists(cert_path):
                reissued.append(daemon_id)
            # Missing, half missing, signed by a CA since replaced (every
            # handshake would fail), or about to expire: a new pair from the
            # current CA (a daemon reads it at its next start).
            key = ec.generate_private_key(ec.SECP256R1())
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, daemon_id)])
            cert = (self._builder(subject, ca_cert.subject, key.public_key(), CERT_DAYS)
                    .add_extension(x509.SubjectAlternativeName(_alt_names(host)), critical=False)
                    .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                   critical=True)
                    .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                          ExtendedKeyUsageOID.CLIENT_AUTH]),
                                   critical=False)
                    .sign(ca_key, hashes.SHA256()))
            self._write(key_path, _key_pem(key), replace=True)
            self._write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644,
                        replace=True)
        if reissued:
            # A running daemon keeps the pair it read at start: until it restarts,
            # handshakes with holders of the new ones fail.
            self.warnings.append(
                f"issued new TLS certificates for {', '.join(reissued)}: restart the daemons "
                "(supervisorctl restart all, or systemctl restart tarefa.target on every "
                "machine) so they load them; until then their handshakes with the new ones fail")

    @staticmethod
    def _builder(subject: x509.Name, issuer: x509.Name, public_key: object,
                 days: int) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=days)))

    # -- MQTT --------------------------------------------------------------------

    def _mqtt(self, directory: str) -> None:
        logins = [(d, kind) for d, kind, _ in self.daemons() if kind in ("portal", "listener")]
        before = len(self.created)
        for daemon_id, _ in logins:
            self._secret(os.path.join(directory, daemon_id))
        new_passwords = len(self.created) > before
        acl = [
            "# Written by tarefa-secrets from the cluster file; re-run it after editing that.",
            "# Portals publish and subscribe on the event topics, the listener only",
            "# subscribes; any other login may do neither (no anonymous access)."]
        topics = events.subscription(self.cluster.name)
        for daemon_id, kind in logins:
            access = "readwrite" if kind == "portal" else "read"
            acl += ["", f"user {daemon_id}", f"topic {access} {topics}"]
        acl_path = os.path.join(directory, MOSQUITTO_ACL)
        acl_text = "\n".join(acl).encode() + b"\n"
        rewritten = []  # broker files replaced (a broker may have loaded the old ones)
        current = _content(acl_path)
        if current != acl_text:  # e.g. the cluster was renamed: new topics
            self._write(acl_path, acl_text, replace=True)
            if current is not None:
                rewritten.append(MOSQUITTO_ACL)
        passwd_path = os.path.join(directory, MOSQUITTO_PASSWD)
        if new_passwords or _users(passwd_path) != [d for d, _ in logins]:
            existed = os.path.exists(passwd_path)
            lines = []
            for daemon_id, _ in logins:
                with open(os.path.join(directory, daemon_id), encoding="utf-8") as handle:
                    password = handle.readline().strip()
                lines.append(f"{daemon_id}:{mosquitto_hash(password)}")
            self._write(passwd_path, "\n".join(lines).encode() + b"\n", replace=True)
            if existed:
                rewritten.append(MOSQUITTO_PASSWD)
        # else: the same logins and passwords: the file is kept (its hashes are salted)
        if rewritten:
            # Mosquitto keeps the files it read at start: found by review, a
            # rotated login was refused ("Not authorized") and, after a cluster
            # rename, every event was dropped by the old ACL while every daemon
            # looked healthy.
            self.warnings.append(
                f"rewrote {' and '.join(rewritten)}: the broker keeps the files it read at "
                "start; reload it before restarting the daemons that use the new logins or "
                "topics (under supervisord: supervisorctl signal HUP broker; under systemd, "
                "systemd/install-units.sh on the broker's machine copies them and restarts "
                "Mosquitto)")


def _content(path: str) -> bytes | None:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _users(passwd_path: str) -> list[str]:
    try:
        with open(passwd_path, encoding="utf-8") as handle:
            return [line.split(":", 1)[0] for line in handle if ":" in line]
    except OSError:
        return []


def mosquitto_hash(password: str, salt: bytes | None = None) -> str:
    """A password-file entry Mosquitto 2 accepts (what mosquitto_passwd writes)."""
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, MOSQUITTO_ITERATIONS)
    return f"$7${MOSQUITTO_ITERATIONS}${base64.b64encode(salt).decode()}$" \
           f"{base64.b64encode(digest).decode()}"


def _expires_soon(cert: x509.Certificate) -> bool:
    """Whether `cert` expires within RENEW_DAYS."""
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    return left < datetime.timedelta(days=RENEW_DAYS)


def _still_good(cert_path: str, ca_cert: x509.Certificate) -> bool:
    """Whether the certificate at `cert_path` exists, is signed by `ca_cert` and
    is not about to expire (read and parsed once)."""
    try:
        with open(cert_path, "rb") as handle:
            cert = x509.load_pem_x509_certificate(handle.read())
        cert.verify_directly_issued_by(ca_cert)
    except (FileNotFoundError, ValueError, TypeError, InvalidSignature):
        return False
    return not _expires_soon(cert)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _alt_names(host: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        address = ipaddress.ip_address(host)
        if str(address) != "127.0.0.1":
            names.append(x509.IPAddress(address))
    except ValueError:
        if host != "localhost":
            names.append(x509.DNSName(host))
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tarefa-secrets",
        description="Create the tokens, passwords and TLS certificates the cluster file names "
                    "(only those missing; never overwrites).")
    parser.add_argument("--config", required=True, help="the cluster file")
    parser.add_argument("--owner", help="give the files to this user (e.g. tarefa under systemd)")
    args = parser.parse_args(argv)
    try:
        provisioner = Provisioner(load_cluster(args.config), args.owner)
        created = provisioner.run()
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"Error: {problem}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"Error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    for path in created:
        print(f"tarefa-secrets: wrote {path}")
    for warning in provisioner.warnings:
        print(f"Warning: {warning}", file=sys.stderr)
    if not created:
        print("tarefa-secrets: every secret the cluster file names exists")
    return 0


if __name__ == "__main__":
    sys.exit(main())
