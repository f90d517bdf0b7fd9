"""The cluster's keys: the key directory's life cycle, clear errors, and real CurveZMQ sockets
in this process (a server with its ZAP handler, clients with good, unknown and wrong keys)."""

import os
import stat
import time

import pytest
import zmq

from pmgd_node.shell import keys as k


def _exchange(server_keys, client_keys, wait_s: float = 3.0):
    """A ROUTER server and a DEALER client on loopback: (what the server got, the client's failure)."""
    ctx = zmq.Context()
    auth = k.guard(ctx, server_keys)
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    k.bind(server, "tcp://127.0.0.1:*", server_keys, "PMGD_KEYS")
    endpoint = server.getsockopt_string(zmq.LAST_ENDPOINT)
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    handshake = k.Handshake(client, endpoint, client_keys)
    k.connect(client, endpoint, client_keys)
    client.send(b"hello")
    got, why, deadline = None, "", time.monotonic() + wait_s
    while time.monotonic() < deadline and got is None and not why:
        if server.poll(50):
            got = server.recv_multipart()[-1]
        why = handshake.failure()
    handshake.close()
    client.close()
    server.close()
    if auth is not None:
        auth.stop()
    ctx.term()
    return got, why


def test_init_add_revoke_and_the_files_they_leave(tmp_path):
    d = str(tmp_path / "keys")
    assert k.init(d) is True
    assert sorted(os.listdir(d)) == ["authorized", "client.key", "client.key_secret", "server.key",
                                     "server.key_secret"]
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(d, "server.key_secret")).st_mode) == 0o600
    with pytest.raises(FileExistsError):
        k.init(d)  # never overwrites a server key
    assert k.init(d, if_missing=True) is False
    k.add(d, "alice")
    assert sorted(os.listdir(os.path.join(d, "authorized"))) == ["alice.key", "client.key"]
    with pytest.raises(FileExistsError):
        k.add(d, "alice")
    with pytest.raises(ValueError, match="key name"):
        k.add(d, "../evil")
    k.revoke(d, "alice")
    assert os.listdir(os.path.join(d, "authorized")) == ["client.key"]


def test_missing_or_damaged_keys_name_the_file(tmp_path):
    d = tmp_path / "keys"
    with pytest.raises(k.KeysError, match=f"{d}/server.key is missing.*pmgd keys init {d}"):
        k.load(str(d))
    k.init(str(d))
    os.remove(d / "server.key_secret")
    with pytest.raises(k.KeysError, match="server.key_secret is missing"):
        k.load(str(d), k.SERVER)
    (d / "client.key_secret").write_text("not a certificate\n")
    with pytest.raises(k.KeysError, match="client.key_secret"):
        k.load(str(d))
    assert k.load_optional("") is None


@pytest.mark.parametrize("endpoint, local", [
    ("tcp://127.0.0.1:5555", True), ("tcp://localhost:5555", True), ("tcp://[::1]:5555", True),
    ("ipc:///tmp/x", True), ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://10.0.0.1:5555", False),
    ("tcp://broadcaster:5555", False)])
def test_keys_are_required_beyond_loopback(endpoint, local):
    assert k.is_loopback(endpoint) is local
    if not local:
        sock = zmq.Context.instance().socket(zmq.PUB)
        try:
            with pytest.raises(k.KeysError, match="reachable beyond this machine.*PMGD_KEYS"):
                k.bind(sock, endpoint, None, "PMGD_KEYS")
        finally:
            sock.close(0)


def test_an_authorized_client_is_heard_and_every_other_one_gets_a_clear_error(tmp_path):
    d, other = str(tmp_path / "keys"), str(tmp_path / "other")
    k.init(d)
    k.init(other)
    k.add(d, "bob")
    server = k.load(d, k.SERVER)
    assert _exchange(server, k.load(d)) == (b"hello", "")
    got, why = _exchange(server, None)  # no keys at all
    assert got is None and "requires the cluster's keys (set PMGD_KEYS" in why
    got, why = _exchange(server, k.load(other))  # another cluster's keys: another server key
    assert got is None and f"another server key than {other}/server.key" in why
    k.revoke(d, "bob")  # the server re-reads authorized/: no restart
    got, why = _exchange(server, k.load(d, "bob"))
    assert got is None and f"refused our key {d}/bob.key" in why
    got, why = _exchange(None, k.load(d))  # a server without keys
    assert got is None and "does not use keys" in why
