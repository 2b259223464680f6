"""client/credentials.py: where the CLI finds the admin token and a client secret."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from client.credentials import Credentials, CredentialsError, read_credentials_file
from daemons.core.config import Security


def write(path, text: str, mode: int = 0o600) -> str:
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_file_format_and_mode(tmp_path):
    good = write(tmp_path / "c", "# me\n\ncid=7\nsecret = s3cret\ntoken=tok\n")
    assert read_credentials_file(good) == {"cid": "7", "secret": "s3cret", "token": "tok"}
    loose = write(tmp_path / "loose", "secret=s3cret\n", 0o640)
    with pytest.raises(CredentialsError, match="chmod 600") as info:
        read_credentials_file(loose)
    assert "s3cret" not in str(info.value)
    for text, word in (("password=x\n", "expected one of"), ("secret=\n", "empty"),
                       ("just-a-secret\n", "expected one of")):
        with pytest.raises(CredentialsError, match=word) as info:
            read_credentials_file(write(tmp_path / "bad", text))
        assert "just-a-secret" not in str(info.value)
    with pytest.raises(CredentialsError, match="cannot read"):
        read_credentials_file(str(tmp_path / "absent"))


def test_a_key_given_twice_is_refused_without_showing_either_value(tmp_path):
    """Found by review: the last of two secret= lines silently won."""
    path = write(tmp_path / "c", "cid=7\nsecret=old-s3cret\n\nsecret=new-s3cret\n")
    with pytest.raises(CredentialsError, match=r":4: secret: given again \(first on line 2\)") \
            as info:
        read_credentials_file(path)
    assert "s3cret" not in str(info.value)


def test_precedence_flag_env_file_cluster(tmp_path):
    path = write(tmp_path / "c", "token=from-file\nsecret=file-secret\ncid=7\n")
    token_file = write(tmp_path / "admin.token", "from-cluster-file\n")
    # Only the security section matters here.
    cluster = SimpleNamespace(security=Security(auth="token", admin_token_file=token_file))
    env = {"TAREFA_TOKEN": "from-env", "TAREFA_SECRET": "env-secret",
           "TAREFA_CREDENTIALS": path}
    assert Credentials(None, "from-flag", "flag-secret", env).admin_token(cluster) == "from-flag"
    assert Credentials(None, None, "flag-secret", env).client_secret() == "flag-secret"
    assert Credentials(None, env=env).admin_token(cluster) == "from-env"
    assert Credentials(None, env=env).client_secret() == "env-secret"
    assert Credentials(None, env={"TAREFA_CREDENTIALS": path}).admin_token(cluster) == "from-file"
    assert Credentials(path, env={}).client_secret() == "file-secret"
    assert Credentials(path, env={}).cid() == "7"
    assert Credentials(None, env={}).admin_token(cluster) == "from-cluster-file"
    assert Credentials(None, env={}).admin_token(None) is None
    assert Credentials(None, env={}).client_secret() is None
    (tmp_path / "admin.token").chmod(0o644)  # refused by the daemons: not used here either
    assert Credentials(None, env={}).admin_token(cluster) is None
