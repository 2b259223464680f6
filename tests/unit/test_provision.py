"""tarefa-secrets: creates exactly what the cluster file names, safely, once."""

from __future__ import annotations

import base64
import copy
import hashlib
import os
import stat

import pytest
import yaml
from cryptography import x509

from daemons.core.config import parse_cluster
from daemons.core.errors import ConfigError
from daemons.core.provision import MOSQUITTO_ACL, MOSQUITTO_PASSWD, Provisioner, main, \
    mosquitto_hash
from daemons.core.security import read_secret_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def cluster_file(tmp_path):
    with open(os.path.join(ROOT, "config", "cluster.yaml"), encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    raw = copy.deepcopy(raw)
    path = tmp_path / "etc" / "cluster.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(raw))
    return path


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_creates_every_secret_once_with_private_modes(cluster_file, tmp_path, capsys):
    assert main(["--config", str(cluster_file)]) == 0
    secrets = tmp_path / "run" / "secrets"
    daemons = ["replica-1", "replica-2", "replica-3", "portal-admin", "portal-client-1",
               "portal-client-2", "listener"]
    private = [secrets / "admin.token", secrets / "raft.password", secrets / "tls" / "ca.key"]
    private += [secrets / "tls" / f"{d}.key" for d in [*daemons, "tarefa"]]
    private += [secrets / "mqtt" / d for d in daemons[3:]]
    private += [secrets / "mqtt" / MOSQUITTO_PASSWD, secrets / "mqtt" / MOSQUITTO_ACL]
    for path in private:
        assert mode(path) == 0o600, path
    for path in [secrets / "tls" / "ca.crt", *[secrets / "tls" / f"{d}.crt" for d in daemons]]:
        assert mode(path) == 0o644, path
    assert mode(secrets) == 0o700
    token = read_secret_file(str(secrets / "admin.token"), "admin token")
    assert len(token) >= 40
    out = capsys.readouterr().out
    assert token not in out and "admin.token" in out  # paths are printed, secrets never

    before = {p: p.read_bytes() for p in secrets.rglob("*") if p.is_file()}
    assert main(["--config", str(cluster_file)]) == 0
    assert "every secret the cluster file names exists" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in secrets.rglob("*") if p.is_file()} == before


def test_certificates_chain_to_the_ca_and_name_the_host(cluster_file, tmp_path):
    raw = yaml.safe_load(cluster_file.read_text())
    raw["portals"][1]["host"] = "10.1.2.3"
    raw["portals"][2]["host"] = "portal.example"
    cluster = parse_cluster(raw, str(cluster_file), str(cluster_file.parent))
    Provisioner(cluster).run()
    tls = tmp_path / "run" / "secrets" / "tls"
    ca = x509.load_pem_x509_certificate((tls / "ca.crt").read_bytes())
    for name, extra in (("portal-client-1", "10.1.2.3"), ("portal-client-2", "portal.example"),
                        ("replica-1", None)):
        cert = x509.load_pem_x509_certificate((tls / f"{name}.crt").read_bytes())
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = {str(v) for v in sans.get_values_for_type(x509.DNSName)} | \
            {str(v) for v in sans.get_values_for_type(x509.IPAddress)}
        assert {"localhost", "127.0.0.1"} <= names
        if extra:
            assert extra in names


def test_acl_lets_portals_write_and_the_listener_only_read(cluster_file, tmp_path):
    main(["--config", str(cluster_file)])
    acl = (tmp_path / "run" / "secrets" / "mqtt" / MOSQUITTO_ACL).read_text()
    assert "user portal-client-1\ntopic readwrite tarefa/tarefa/#" in acl
    assert "user listener\ntopic read tarefa/tarefa/#" in acl
    users = (tmp_path / "run" / "secrets" / "mqtt" / MOSQUITTO_PASSWD).read_text().split("\n")
    assert [u.split(":")[0] for u in users if u] == [
        "portal-admin", "portal-client-1", "portal-client-2", "listener"]
    password = read_secret_file(str(tmp_path / "run" / "secrets" / "mqtt" / "listener"), "x")
    assert password not in acl and password not in "\n".join(users)


def test_renaming_the_cluster_rewrites_the_acl_and_keeps_the_passwords(cluster_file, tmp_path,
                                                                      capsys):
    main(["--config", str(cluster_file)])
    assert "Warning" not in capsys.readouterr().err  # a first run: no broker has them yet
    mqtt = tmp_path / "run" / "secrets" / "mqtt"
    passwd = (mqtt / MOSQUITTO_PASSWD).read_text()
    raw = yaml.safe_load(cluster_file.read_text())
    raw["cluster"]["name"] = "prod"
    cluster_file.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(cluster_file)]) == 0
    acl = (mqtt / MOSQUITTO_ACL).read_text()
    assert "topic readwrite tarefa/prod/#" in acl and "tarefa/tarefa/" not in acl
    assert (mqtt / MOSQUITTO_PASSWD).read_text() == passwd  # same logins: not rehashed
    # A running broker keeps the old ACL: it would drop every event on the new topics.
    err = capsys.readouterr().err
    assert "Warning: rewrote mosquitto.acl: the broker keeps the files" in err
    assert "signal HUP broker" in err


def test_a_rotated_login_says_the_broker_must_reload_its_password_file(cluster_file,
                                                                       tmp_path, capsys):
    main(["--config", str(cluster_file)])
    mqtt = tmp_path / "run" / "secrets" / "mqtt"
    os.unlink(mqtt / "portal-client-1")
    capsys.readouterr()
    assert main(["--config", str(cluster_file)]) == 0
    err = capsys.readouterr().err
    assert "Warning: rewrote mosquitto.passwd: the broker keeps the files" in err
    main(["--config", str(cluster_file)])  # nothing changed: nothing to reload
    assert "Warning" not in capsys.readouterr().err


def test_mosquitto_hash_is_pbkdf2_sha512():
    salt = b"0123456789ab"
    entry = mosquitto_hash("pw", salt)
    _, seven, iterations, salt64, digest64 = entry.split("$")
    assert seven == "7" and base64.b64decode(salt64) == salt
    assert base64.b64decode(digest64) == hashlib.pbkdf2_hmac("sha512", b"pw", salt,
                                                             int(iterations))


def test_a_ca_certificate_without_its_key_is_refused(cluster_file, tmp_path):
    main(["--config", str(cluster_file)])
    os.unlink(tmp_path / "run" / "secrets" / "tls" / "ca.key")
    raw = yaml.safe_load(cluster_file.read_text())
    with pytest.raises(ConfigError, match="must both exist or both be absent"):
        Provisioner(parse_cluster(raw, str(cluster_file), str(cluster_file.parent))).run()


def test_deleting_a_secret_and_rerunning_rotates_only_it(cluster_file, tmp_path):
    main(["--config", str(cluster_file)])
    secrets = tmp_path / "run" / "secrets"
    raft = (secrets / "raft.password").read_text()
    token = (secrets / "admin.token").read_text()
    os.unlink(secrets / "admin.token")
    main(["--config", str(cluster_file)])
    assert (secrets / "admin.token").read_text() != token
    assert (secrets / "raft.password").read_text() == raft


def test_certificates_near_expiry_are_issued_again_and_an_expiring_ca_is_reported(
        cluster_file, tmp_path, monkeypatch, capsys):
    import daemons.core.provision as provision

    main(["--config", str(cluster_file)])
    tls = tmp_path / "run" / "secrets" / "tls"
    before = {p.name: p.read_bytes() for p in tls.iterdir()}
    capsys.readouterr()
    # 30 days before the daemons' certificates expire (825 days), not yet the CA's (1650).
    monkeypatch.setattr(provision, "RENEW_DAYS", provision.CERT_DAYS + 1)
    assert main(["--config", str(cluster_file)]) == 0
    after = {p.name: p.read_bytes() for p in tls.iterdir()}
    renewed = {name for name in before if before[name] != after[name]}
    assert "replica-1.crt" in renewed and "tarefa.crt" in renewed
    assert "ca.crt" not in renewed and "ca.key" not in renewed
    err = capsys.readouterr().err
    assert "expires on" not in err and "restart the daemons" in err
    monkeypatch.setattr(provision, "RENEW_DAYS", 2 * provision.CERT_DAYS + 1)
    assert main(["--config", str(cluster_file)]) == 0
    err = capsys.readouterr().err
    assert "Warning: " in err and "ca.crt expires on" in err and "every machine" in err


def test_an_expired_certificate_is_refused_by_name_and_a_re_run_replaces_it(cluster_file,
                                                                           tmp_path):
    import datetime

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from daemons.core.config import load_cluster
    from daemons.core.security import load_tls

    main(["--config", str(cluster_file)])
    cluster = load_cluster(str(cluster_file))
    tls = tmp_path / "run" / "secrets" / "tls"
    ca_key = serialization.load_pem_private_key((tls / "ca.key").read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate((tls / "ca.crt").read_bytes())
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    old = (x509.CertificateBuilder().subject_name(ca.subject).issuer_name(ca.subject)
           .public_key(key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now - datetime.timedelta(days=900))
           .not_valid_after(now - datetime.timedelta(days=1))
           .sign(ca_key, hashes.SHA256()))
    (tls / "replica-1.crt").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match=r"replica-1.crt: the TLS certificate of replica-1 "
                                          r"expired on .*run tarefa-secrets"):
        load_tls(cluster.security.tls, "replica-1")
    assert main(["--config", str(cluster_file)]) == 0  # issued again (expired)
    assert load_tls(cluster.security.tls, "replica-1") is not None


def test_rotating_the_ca_reissues_every_certificate_it_signed(cluster_file, tmp_path, capsys):
    main(["--config", str(cluster_file)])
    tls = tmp_path / "run" / "secrets" / "tls"
    before = {p.name: p.read_bytes() for p in tls.iterdir()}
    main(["--config", str(cluster_file)])  # nothing to do: every pair is kept
    assert {p.name: p.read_bytes() for p in tls.iterdir()} == before
    assert "Warning" not in capsys.readouterr().err
    os.unlink(tls / "ca.crt")
    os.unlink(tls / "ca.key")
    main(["--config", str(cluster_file)])
    # Running daemons keep their old pairs: found by review, nothing said so.
    err = capsys.readouterr().err
    assert "Warning: issued new TLS certificates for replica-1, replica-2" in err
    assert "restart the daemons" in err
    ca = x509.load_pem_x509_certificate((tls / "ca.crt").read_bytes())
    assert (tls / "ca.crt").read_bytes() != before["ca.crt"]
    for name in ("replica-1", "portal-admin", "listener", "tarefa"):
        cert = x509.load_pem_x509_certificate((tls / f"{name}.crt").read_bytes())
        cert.verify_directly_issued_by(ca)  # the old pair would fail every handshake
        assert (tls / f"{name}.key").read_bytes() != before[f"{name}.key"]


def test_group_readable_secret_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "token"
    path.write_text("s3cr3t-value-that-must-not-leak\n")
    os.chmod(path, 0o640)
    with pytest.raises(ConfigError) as info:
        read_secret_file(str(path), "admin token")
    assert str(path) in info.value.message and "chmod 600" in info.value.message
    assert "s3cr3t" not in info.value.message
    os.chmod(path, 0o600)
    assert read_secret_file(str(path), "admin token") == "s3cr3t-value-that-must-not-leak"
    path.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_secret_file(str(path), "admin token")
