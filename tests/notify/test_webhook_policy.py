"""Webhook URLs cannot make the service a request-forgery tool: off regtest only https to
hosts whose every address is public, at registration (422 naming `url`) and again at
each delivery, which then connects to the address it checked (a DNS answer that changes
in between, "rebinding", cannot redirect it) and never follows a redirect.

The DNS answers come from an injected resolver; everything else is real: the API, the
database (both backends), local HTTP and TLS servers on 127.0.0.1."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from support.tls import Tls, self_signed
from support.world import World, build_world

from custody.db.models import Outbox
from custody.db.session import transaction
from custody.netpolicy import IPAddress, UrlPolicy
from custody.notify.delivery import deliver_due
from custody.notify.outbox import enqueue

SECRET = "w" * 40
PUBLIC = ipaddress.ip_address("93.184.216.34")
PUBLIC6 = ipaddress.ip_address("2606:4700:4700::1111")
LOCAL = ipaddress.ip_address("127.0.0.1")
LOCAL6 = ipaddress.ip_address("::1")


@dataclass
class FakeDns:
    """Answers by name, changeable between calls (a rebinding attacker's DNS)."""

    answers: dict[str, list[IPAddress]] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)

    def __call__(self, host: str, port: int) -> Sequence[IPAddress]:
        self.asked.append(host)
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            return list(self.answers.get(host, []))


@dataclass
class Listener:
    """A TCP port on 127.0.0.1 that counts the connections it accepts (and answers none)."""

    port: int
    accepted: list[tuple[str, int]] = field(default_factory=list)


@pytest.fixture
def listener() -> Iterator[Listener]:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.05)
    seen = Listener(port=sock.getsockname()[1])
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, peer = sock.accept()
            except TimeoutError:
                continue
            seen.accepted.append(peer)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield seen
    stop.set()
    thread.join(timeout=5)
    sock.close()


@dataclass
class Receiver:
    """A local HTTP(S) server answering every POST with `status` (and `location`)."""

    port: int
    status: int = 204
    location: str | None = None
    seen: list[dict[str, str]] = field(default_factory=list)
    sni: list[str | None] = field(default_factory=list)


def _serve(receiver: Receiver, server: ThreadingHTTPServer) -> Iterator[Receiver]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _server(receiver: Receiver) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            receiver.seen.append({k.lower(): v for k, v in self.headers.items()})
            self.send_response(receiver.status)
            if receiver.location:
                self.send_header("Location", receiver.location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", receiver.port), Handler)
    receiver.port = server.server_address[1]
    return server


@pytest.fixture
def second() -> Iterator[Receiver]:
    """Where a redirect points: it must never be called."""
    receiver = Receiver(port=0)
    yield from _serve(receiver, _server(receiver))


@pytest.fixture
def redirector(second: Receiver) -> Iterator[Receiver]:
    receiver = Receiver(port=0, status=302, location=f"http://127.0.0.1:{second.port}/stolen")
    yield from _serve(receiver, _server(receiver))


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A self-signed certificate for the name `hooks.test` (and nothing else)."""
    return self_signed(tmp_path_factory.mktemp("tls"), "hooks.test")


@pytest.fixture
def tls_receiver(tls: Tls) -> Iterator[Receiver]:
    """An https receiver on 127.0.0.1 that records the SNI name each handshake sent."""
    receiver = Receiver(port=0)
    server = _server(receiver)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.cert, tls.key)

    def on_sni(_sock: ssl.SSLObject, name: str, _ctx: ssl.SSLContext) -> None:
        receiver.sni.append(name)

    context.sni_callback = on_sni
    server.socket = context.wrap_socket(server.socket, server_side=True)
    yield from _serve(receiver, server)


def _world(engine: Engine, network: str, dns: FakeDns) -> World:
    world = build_world(engine, network=network)
    world.client.app.state.resolve = dns
    return world


def _register(world: World, url: str) -> httpx.Response:
    response: httpx.Response = world.call(
        "miner",
        "POST",
        f"/v1/parties/{world.party_ids['miner']}/webhooks",
        json={"url": url, "secret": SECRET, "events": "*"},
    )
    return response


def _queue_one(world: World) -> str:
    with transaction(world.engine) as s:
        (the_id,) = enqueue(
            s, party_ids=[world.party_ids["miner"]], event_type="loan.active", payload={}, key="x"
        )
    return the_id


def _last_errors(engine: Engine) -> list[str | None]:
    with Session(engine) as s:
        return [r.last_error for r in s.exec(select(Outbox).order_by(col(Outbox.id))).all()]


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5.0, trust_env=False) as c:
        yield c


def test_registration_off_regtest_refuses_every_non_public_host(engine: Engine) -> None:
    dns = FakeDns(
        {
            "intranet.example": [ipaddress.ip_address("10.1.2.3")],
            "metadata.example": [ipaddress.ip_address("169.254.169.254")],
            "mixed.example": [PUBLIC, ipaddress.ip_address("192.168.1.1")],
            "cgnat.example": [ipaddress.ip_address("100.64.0.7")],
            "mapped.example": [ipaddress.ip_address("::ffff:127.0.0.1")],
            "public.example": [PUBLIC, PUBLIC6],
        }
    )
    world = _world(engine, "testnet", dns)
    refused = [
        "http://public.example/hook",  # plain http, even to a public host
        "http://127.0.0.1/hook",
        "https://127.0.0.1/hook",
        "https://localhost/hook",
        "https://10.0.0.1/hook",
        "https://169.254.169.254/latest/meta-data/",
        "https://[::1]/hook",
        "https://[::ffff:10.0.0.1]/hook",
        "https://[fe80::1]/hook",
        "https://0.0.0.0/hook",
        "https://224.0.0.1/hook",
        "https://100.64.0.1/hook",
        "https://intranet.example/hook",
        "https://metadata.example/hook",
        "https://mixed.example/hook",  # one private address is enough
        "https://cgnat.example/hook",
        "https://mapped.example/hook",
        "https://nowhere.example/hook",  # does not resolve
    ]
    for url in refused:
        r = _register(world, url)
        assert r.status_code == 422, (url, r.text)
        assert r.json()["error"] == "url_not_allowed" and r.json()["field"] == "url", url
        assert r.json()["message"], url
    # localhost resolves through the system on this machine: still refused, it is loopback.
    world.client.app.state.resolve = lambda host, port: [LOCAL]
    assert _register(world, "https://localhost:8443/hook").status_code == 422
    world.client.app.state.resolve = dns

    r = _register(world, "https://public.example/hook")
    assert r.status_code == 201, r.text
    listed = world.call("miner", "GET", f"/v1/parties/{world.party_ids['miner']}/webhooks")
    assert [h["url"] for h in listed.json()] == ["https://public.example/hook"]


def test_regtest_keeps_local_receivers_and_refuses_plain_http_elsewhere(engine: Engine) -> None:
    dns = FakeDns({"lan.example": [ipaddress.ip_address("10.0.0.9")], "localhost": [LOCAL, LOCAL6]})
    world = _world(engine, "regtest", dns)
    for url in ("http://127.0.0.1:9/a", "http://localhost:9/b", "http://[::1]:9/c"):
        assert _register(world, url).status_code == 201, url
    for url in ("http://10.0.0.1/hook", "http://lan.example/hook", "http://example.com/h"):
        r = _register(world, url)
        assert r.status_code == 422 and r.json()["error"] == "url_not_allowed", url
    assert _register(world, "https://lan.example/hook").status_code == 201


def test_a_host_rebound_to_a_private_address_after_registration_gets_nothing(
    engine: Engine, listener: Listener, client: httpx.Client
) -> None:
    """The rebinding attack: public when registered, loopback (where something listens)
    when delivered. The delivery checks again, refuses, and never connects."""
    dns = FakeDns({"rebind.example": [PUBLIC]})
    world = _world(engine, "testnet", dns)
    r = _register(world, f"https://rebind.example:{listener.port}/hook")
    assert r.status_code == 201, r.text
    _queue_one(world)

    dns.answers["rebind.example"] = [LOCAL]
    urls = UrlPolicy.for_network("testnet")
    report = deliver_due(engine, client=client, urls=urls, resolve=dns)
    assert report.attempted == 1 and report.delivered == 0
    [error] = _last_errors(engine)
    assert error is not None and error.startswith("refused:") and "loopback" in error
    # A mix is refused too: every address is checked, not just the first.
    dns.answers["rebind.example"] = [PUBLIC, LOCAL]
    with transaction(engine) as s:
        row = s.exec(select(Outbox)).one()
        row.next_attempt_at = row.created_at
        s.add(row)
    assert deliver_due(engine, client=client, urls=urls, resolve=dns).delivered == 0
    assert listener.accepted == []
    assert dns.asked.count("rebind.example") == 3  # registration and each delivery


def test_delivery_connects_to_the_checked_address_with_the_name_in_host_and_sni(
    engine: Engine, tls: Tls, tls_receiver: Receiver
) -> None:
    """`hooks.test` exists only in the injected resolver: reaching the receiver at all
    proves the request went to the address that was checked, not to a second lookup;
    the certificate (for hooks.test only) verified, so SNI and the check used the name."""
    dns = FakeDns({"hooks.test": [LOCAL]})
    world = _world(engine, "regtest", dns)
    url = f"https://hooks.test:{tls_receiver.port}/in"
    assert _register(world, url).status_code == 201
    the_id = _queue_one(world)
    trust = ssl.create_default_context(cafile=str(tls.cert))
    with httpx.Client(timeout=5.0, trust_env=False, verify=trust) as client:
        report = deliver_due(
            engine, client=client, urls=UrlPolicy.for_network("regtest"), resolve=dns
        )
    assert report.delivered == 1, _last_errors(engine)
    [seen] = tls_receiver.seen
    assert seen["host"] == f"hooks.test:{tls_receiver.port}"
    assert seen["x-custody-event-id"] == the_id
    assert tls_receiver.sni == ["hooks.test"]


def test_a_redirect_is_a_failed_delivery_and_is_not_followed(
    engine: Engine, redirector: Receiver, second: Receiver
) -> None:
    world = _world(engine, "regtest", FakeDns())
    assert _register(world, f"http://127.0.0.1:{redirector.port}/hook").status_code == 201
    _queue_one(world)
    # Even a client built to follow redirects does not follow this one.
    with httpx.Client(timeout=5.0, trust_env=False, follow_redirects=True) as client:
        report = deliver_due(engine, client=client, urls=UrlPolicy.for_network("regtest"))
    assert report.delivered == 0 and report.failed == 1
    assert len(redirector.seen) == 1
    assert second.seen == []
    assert _last_errors(engine) == ["HTTP 302"]
