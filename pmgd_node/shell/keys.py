"""The cluster's keys: CurveZMQ certificates, who may connect, and sockets that use them.

Every ZeroMQ link between the services (node ↔ broadcaster, client ↔ broadcaster,
broadcaster ↔ evaluator) can be authenticated and encrypted with CurveZMQ: the servers (the
sockets that bind: broadcaster, evaluator) prove they hold the secret of ``server.key``, and
accept only clients whose public key is in ``authorized/``; a ZAP handler (pyzmq's
``zmq.auth``) makes that decision for every new connection, before any frame of it reaches
the service. A stranger's connection ends in the handshake: it can neither read the job
nor inject a frame. See docs/security.md for the threat model.

A key directory (``pmgd keys init DIR``)::

    server.key  server.key_secret     the servers' identity (the secret stays with them)
    client.key  client.key_secret     the default client identity (nodes, API, CLI)
    NAME.key    NAME.key_secret       further clients (``pmgd keys add DIR NAME``)
    authorized/NAME.key               public keys the servers accept (``pmgd keys revoke``)

The servers re-read ``authorized/`` when it changes, so adding or revoking a client needs no
restart (a revoked client's open connections last until they reconnect).

Keys are required whenever a server binds beyond loopback (:func:`bind`); on loopback a
cluster may run without them (one user's machine), and ``pmgd up`` makes fresh keys anyway.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

SERVER = "server"
CLIENT = "client"
AUTHORIZED = "authorized"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
_monitors = itertools.count()


class KeysError(ValueError):
    """A key file is missing or unreadable; the message names the file and how to make it."""


class HandshakeRefused(RuntimeError):
    """A server refused our handshake (or we its): the message says which key is wrong."""


@dataclasses.dataclass(frozen=True)
class Keys:
    """One party's view of a key directory: its own key pair and the server's public key."""

    directory: str
    name: str  # "server", or the client's certificate name
    public: bytes
    secret: bytes
    server_public: bytes

    @property
    def authorized(self) -> str:
        return os.path.join(self.directory, AUTHORIZED)


def _check_name(name: str) -> str:
    if not _NAME.match(name) or name == SERVER:
        raise ValueError(f"key name {name!r}: letters, digits, '_', '.', '-' (at most 64), not {SERVER!r}")
    return name


def _write_pair(directory: str, name: str) -> None:
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)


def init(directory: str, if_missing: bool = False) -> bool:
    """Make a key directory: the server pair, the default client pair, that client authorized.

    Refuses a directory that already holds a server key (overwriting it would lock every
    party out); make a new directory to rotate the server key. With ``if_missing`` a complete
    directory is left as it is (a container's start, every time): returns whether keys were
    made. A half-made directory, or one with ``server.key`` but not its secret (a client's
    directory), is refused either way.
    """
    def has(*names: str) -> bool:
        return os.path.exists(os.path.join(directory, *names))

    if has(SERVER + ".key_secret"):
        missing = [n for n in (SERVER + ".key", AUTHORIZED + "/") if not has(n)]
        if not missing and not has(CLIENT + ".key_secret") and not any(
                n.endswith(".key") for n in os.listdir(os.path.join(directory, AUTHORIZED))):
            missing.append(f"{CLIENT}.key_secret (or any authorized client)")
        if missing:
            raise KeysError(f"{directory} is half-made: it holds {SERVER}.key_secret but not {', '.join(missing)}; "
                            f"remove it and run `pmgd keys init {directory}` again")
        if if_missing:
            return False
        raise FileExistsError(f"{directory} already holds keys; use a new directory to rotate the server key")
    if has(SERVER + ".key"):
        raise KeysError(f"{directory} holds {SERVER}.key without {SERVER}.key_secret: a client's key directory, or "
                        f"a half-made one; init would replace the cluster's server key (remove it to start over)")
    os.makedirs(os.path.join(directory, AUTHORIZED), exist_ok=True)
    os.chmod(directory, 0o700)
    _write_pair(directory, SERVER)
    add(directory, CLIENT)
    return True


def add(directory: str, name: str) -> None:
    """A new client key pair ``NAME`` in ``directory``, authorized at once."""
    _check_name(name)
    if os.path.exists(os.path.join(directory, name + ".key")):
        raise FileExistsError(f"{directory}/{name}.key exists; pick another name")
    os.makedirs(os.path.join(directory, AUTHORIZED), exist_ok=True)
    _write_pair(directory, name)
    with open(os.path.join(directory, name + ".key"), encoding="ascii") as src:
        text = src.read()
    _atomic_write(os.path.join(directory, AUTHORIZED, name + ".key"), text)


def revoke(directory: str, name: str) -> None:
    """Remove ``NAME`` from the authorized keys (new connections with it are refused)."""
    path = os.path.join(directory, AUTHORIZED, _check_name(name) + ".key")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such authorized key")
    os.remove(path)


def _atomic_write(path: str, text: str) -> None:
    with open(path + ".tmp", "w", encoding="ascii") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _read(path: str, what: str, secret: bool) -> tuple[bytes, bytes | None]:
    directory = os.path.dirname(path)
    if not os.path.exists(path):
        raise KeysError(f"{path} is missing ({what}); make a key directory with `pmgd keys init {directory}`")
    try:
        public, sec = zmq.auth.load_certificate(path)
    except Exception as err:  # zmq.auth raises ValueError/OSError/IndexError on a bad file
        raise KeysError(f"{path} is not a CurveZMQ certificate ({what}): {err}") from None
    if public is None or len(public) != 40 or (secret and (sec is None or len(sec) != 40)):
        raise KeysError(f"{path} does not hold a {'secret' if secret else 'public'} key ({what})")
    return public, sec


def load(directory: str, role: str = CLIENT) -> Keys:
    """``role`` is ``"server"`` (the broadcaster's and evaluator's bound sockets) or a client
    name. Raises :class:`KeysError` naming the missing or damaged file."""
    server_public, server_secret = _read(os.path.join(directory, SERVER + ".key"), "the servers' public key", False)
    if role == SERVER:
        _, server_secret = _read(os.path.join(directory, SERVER + ".key_secret"), "the servers' secret key", True)
        if not os.path.isdir(os.path.join(directory, AUTHORIZED)):
            raise KeysError(f"{directory}/{AUTHORIZED}/ is missing (the public keys the servers accept)")
        return Keys(directory, SERVER, server_public, server_secret, server_public)
    _check_name(role)
    public, secret = _read(os.path.join(directory, role + ".key_secret"), f"client {role!r}'s secret key", True)
    return Keys(directory, role, public, secret, server_public)


def load_optional(directory: str, role: str = CLIENT) -> Keys | None:
    """:func:`load`, or None when ``directory`` is empty (no keys configured)."""
    return load(directory, role) if directory else None


def is_loopback(endpoint: str) -> bool:
    """Does ``endpoint`` stay on this machine (ipc, inproc, or TCP on a loopback address)?"""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    host = urlsplit(endpoint).hostname or ""
    return host in _LOOPBACK_HOSTS or host.startswith("127.")


class _Authorized:
    """ZAP credentials provider: the public keys in ``authorized/``, re-read when it changes."""

    def __init__(self, directory: str, log: logging.Logger):
        self.directory, self.log = directory, log
        self._stamp: tuple | None = None
        self._keys: set[bytes] = set()

    def _refresh(self) -> None:
        names = sorted(n for n in os.listdir(self.directory) if n.endswith(".key"))
        stamp = (os.stat(self.directory).st_mtime_ns, tuple(names))
        if stamp == self._stamp:
            return
        keys = set()
        for name in names:
            try:
                public, _ = zmq.auth.load_certificate(os.path.join(self.directory, name))
            except Exception as err:  # one bad file must not lock everybody out
                self.log.warning("ignoring %s/%s: %s", self.directory, name, err)
                continue
            keys.add(public)
        self._keys, self._stamp = keys, stamp

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            self._refresh()
        except OSError as err:
            self.log.error("cannot read %s: %s", self.directory, err)
            return False
        if key in self._keys:
            return True
        self.log.warning("refused a connection: client key %s is not in %s", key.decode(), self.directory)
        return False


def guard(ctx: zmq.Context, keys: Keys | None) -> ThreadAuthenticator | None:
    """Start the ZAP handler of ``ctx`` (before any server socket binds); None without keys."""
    if keys is None:
        return None
    log = logging.getLogger("pmgd.keys")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("pmgd keys: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    auth = ThreadAuthenticator(ctx, log=log)
    auth.start()
    auth.configure_curve_callback("*", _Authorized(keys.authorized, log))
    return auth


def bind(sock: zmq.Socket, endpoint: str, keys: Keys | None, setting: str) -> None:
    """Bind a server socket, as a CURVE server when there are keys.

    Without keys only loopback is allowed: a socket reachable from other hosts must
    authenticate its peers. ``setting`` names the variable to set in the error.
    """
    if keys is None:
        if not is_loopback(endpoint):
            raise KeysError(f"{endpoint} is reachable beyond this machine, so it needs the cluster's keys: set "
                            f"{setting} to a key directory (make one with `pmgd keys init DIR`)")
    else:
        sock.curve_secretkey, sock.curve_publickey = keys.secret, keys.public
        sock.curve_server = True
    sock.bind(endpoint)


def connect(sock: zmq.Socket, endpoint: str, keys: Keys | None) -> None:
    """Connect a client socket, as a CURVE client of ``keys.server_public`` when there are keys."""
    if keys is not None:
        sock.curve_secretkey, sock.curve_publickey = keys.secret, keys.public
        sock.curve_serverkey = keys.server_public
    sock.connect(endpoint)


class Handshake:
    """Watches a client socket's handshakes, so that a refused key becomes a clear error
    rather than a silent wait (ZeroMQ itself just keeps retrying)."""

    EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
              | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)

    def __init__(self, sock: zmq.Socket, endpoint: str, keys: Keys | None):
        self.endpoint, self.keys, self.sock = endpoint, keys, sock
        # A fresh name each time: a closed socket's monitor endpoint may outlive it briefly.
        self.monitor = sock.get_monitor_socket(self.EVENTS, addr=f"inproc://pmgd-handshake-{next(_monitors)}")
        self._why = ""
        self._shaking = False  # connected, handshake not yet done

    def _explain(self, event: int) -> str:
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            who = f"{self.keys.directory}/{self.keys.name}.key" if self.keys else "this client"
            return f"{self.endpoint} refused our key {who}: it is not in the server's {AUTHORIZED}/ directory"
        if self.keys is None:
            return (f"the handshake with {self.endpoint} failed: the server requires the cluster's keys "
                    "(set PMGD_KEYS to its key directory)")
        # A CURVE server that cannot open our HELLO (another server key) just hangs up.
        return (f"the handshake with {self.endpoint} failed: the server does not use keys, or has another "
                f"server key than {self.keys.directory}/{SERVER}.key")

    def failure(self) -> str:
        """Why the last handshake failed ("" when none has failed since the last success)."""
        from zmq.utils.monitor import recv_monitor_message

        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                self._shaking = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._why, self._shaking = "", False
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL) or (
                    event == zmq.EVENT_DISCONNECTED and self._shaking):
                self._why, self._shaking = self._explain(event), False
        return self._why

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
