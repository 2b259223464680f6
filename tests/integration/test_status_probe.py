"""`tarefa cluster status`'s broker check against a real Mosquitto: it must
answer MQTT, not merely accept a TCP connection (the kernel accepts one for
a frozen broker)."""

from __future__ import annotations

import os
import signal

import pytest

from client.status import mqtt_answers
from daemons.core.provision import MOSQUITTO_ACL, MOSQUITTO_PASSWD
from tests.harness import MosquittoProcess, free_ports


@pytest.mark.parametrize("logins", [False, True])
def test_the_broker_check_needs_an_mqtt_answer(tmp_path, logins):
    auth_dir = None
    if logins:  # a broker that refuses anonymous clients still answers (CONNACK 5)
        auth_dir = str(tmp_path / "mqtt")
        os.makedirs(auth_dir)
        for name in (MOSQUITTO_PASSWD, MOSQUITTO_ACL):
            with open(os.path.join(auth_dir, name), "w", encoding="utf-8"):
                pass
    port = free_ports(1)[0]
    broker = MosquittoProcess(str(tmp_path), port, auth_dir=auth_dir)
    broker.start()
    try:
        broker.wait_ready()
        assert mqtt_answers("127.0.0.1", port, 2.0) is None
        broker.signal(signal.SIGSTOP)  # frozen: TCP connects, nothing answers
        try:
            assert "no MQTT answer within 0.5s" in (mqtt_answers("127.0.0.1", port, 0.5) or "")
        finally:
            broker.signal(signal.SIGCONT)
        assert mqtt_answers("127.0.0.1", port, 2.0) is None
    finally:
        broker.kill()
    assert "refused" in (mqtt_answers("127.0.0.1", port, 1.0) or "").lower()
