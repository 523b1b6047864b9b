"""Web-facing defaults of the one app (UI and API): the Host check (DNS rebinding), no CORS for
other origins, JSON-only API bodies, the throttle on failed logins, and where `medvlm serve`
reads its login from. The app runs on 127.0.0.1 with the tiny taught model."""

from __future__ import annotations

import httpx
import pytest

from serve.engine import Engine
from tests.serve_fixtures import TIMEOUT, free_port, local_server, running

pytestmark = pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")

HELLO = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
CORS_HEADERS = ("access-control-allow-origin", "access-control-allow-credentials")


@pytest.fixture(scope="module")
def served(taught_model):
    from serve.app import build_app

    engine = Engine(taught_model, name="tiny")
    with running(local_server(build_app(engine))) as server:
        server.port = int(server.url.rsplit(":", 1)[1])
        yield server
    engine.close()


# ---- the Host header ----------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/config", "/v1/models", "/health"])
def test_a_foreign_host_header_is_refused_on_every_route(served, path):
    for host in ("evil.example", f"evil.example:{served.port}", "127.0.0.2"):
        r = httpx.get(served.url + path, headers={"Host": host}, timeout=TIMEOUT)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("Host not allowed"), host
    for host in (f"127.0.0.1:{served.port}", f"localhost:{served.port}", f"[::1]:{served.port}"):
        assert httpx.get(served.url + path, headers={"Host": host}, timeout=TIMEOUT).status_code == 200, host


def test_the_allowed_hosts_are_the_bound_port_and_the_names_given():
    from serve.cli import allowed_hosts
    from serve.web_guard import HostGuard
    from vlm.errors import ConfigError

    guard = HostGuard(None, allowed_hosts("127.0.0.1", 8000, "medvlm.lan, 10.0.0.5:8000"))
    for host in ("127.0.0.1:8000", "LOCALHOST:8000", "[::1]:8000", "medvlm.lan", "medvlm.lan:1234", "10.0.0.5:8000"):
        assert guard.allows(host, "http"), host
    for host in ("127.0.0.1:9000", "localhost", "10.0.0.5:9000", "10.0.0.5", "evil.example:8000", "", None):
        assert not guard.allows(host, "http"), host
    assert HostGuard(None, allowed_hosts("127.0.0.1", 80)).allows("localhost", "http"), "port 80 is implied"
    assert "[::1]:8000" in allowed_hosts("::1", 8000) and "0.0.0.0:8000" not in allowed_hosts("0.0.0.0", 8000)
    assert HostGuard(None, allowed_hosts("0.0.0.0", 8000, "*")).allows("anything.example:1", "http")
    default = HostGuard(None)  # create_api without allowed_hosts: the loopback names, any port
    assert default.allows("localhost:1234", "http") and default.allows("127.0.0.1", "http")
    assert not default.allows("evil.example", "http")
    with pytest.raises(ConfigError, match="--allowed-hosts"):
        allowed_hosts("127.0.0.1", 8000, "medvlm.lan:99999")


def test_create_api_with_allowed_hosts_serves_only_those(taught_model):
    from fastapi.testclient import TestClient

    from serve.api import create_api

    engine = Engine(taught_model, name="tiny")
    app = create_api(engine, allowed_hosts=["127.0.0.1:8000", "medvlm.lan"])
    assert TestClient(app, base_url="http://127.0.0.1:8000").get("/health").status_code == 200
    assert TestClient(app, base_url="http://medvlm.lan:9").get("/health").status_code == 200
    assert TestClient(app, base_url="http://127.0.0.1:9000").get("/health").status_code == 400
    assert TestClient(app, base_url="http://localhost:8000").get("/health").status_code == 400
    engine.close()


# ---- CORS ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("origin", ["http://evil.example", "http://localhost:9999", "null"])
def test_no_cross_origin_reads_with_or_without_credentials_and_same_origin_works(served, origin):
    for path in ("/config", "/", "/v1/models", "/gradio_api/info"):
        r = httpx.get(served.url + path, headers={"Origin": origin}, timeout=TIMEOUT)
        assert not any(h in r.headers for h in CORS_HEADERS), (path, dict(r.headers))
    preflight = httpx.options(served.url + "/gradio_api/queue/join", timeout=TIMEOUT, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    assert not any(h in preflight.headers for h in CORS_HEADERS)
    same = {"Origin": served.url}  # the UI's own requests need no CORS headers, and work
    assert httpx.get(served.url + "/config", headers=same, timeout=TIMEOUT).status_code == 200
    r = httpx.post(served.url + "/v1/chat/completions", json=HELLO, headers=same, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["choices"]


# ---- JSON bodies only ---------------------------------------------------------------------------

def test_the_api_takes_only_declared_json_bodies(served):
    url = served.url + "/v1/chat/completions"
    body = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": content_type} if content_type else {}
        r = httpx.post(url, content=body, headers=headers, timeout=TIMEOUT)
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], content_type
    ok = httpx.post(url, content=body, headers={"Content-Type": "Application/JSON; charset=utf-8"}, timeout=TIMEOUT)
    assert ok.status_code == 200


# ---- failed logins ------------------------------------------------------------------------------

def test_failed_logins_are_throttled_per_address(taught_model):
    from fastapi.testclient import TestClient

    from serve.app import build_app

    engine = Engine(taught_model, name="tiny")
    app = build_app(engine, auth=("doc", "s3cret"))

    def client(address: str) -> TestClient:
        return TestClient(app, base_url="http://127.0.0.1", client=(address, 40000))

    with client("10.0.0.1") as guesser:
        for _ in range(5):
            assert guesser.get("/v1/models", auth=("doc", "guess")).status_code == 401
        refused = guesser.get("/v1/models", auth=("doc", "guess"))
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert guesser.get("/v1/models", auth=("doc", "s3cret")).status_code == 429, "a right guess is not tested"
        assert guesser.post("/login", data={"username": "doc", "password": "s3cret"}).status_code == 429

        other = client("10.0.0.2")
        assert other.get("/v1/models", auth=("doc", "s3cret")).status_code == 200, "other addresses are unaffected"
        assert guesser.get("/v1/models", auth=("doc", "s3cret")).status_code == 429, "a success resets no one"

        bare = client("10.0.0.3")  # no credentials at all: not a guess
        assert all(bare.get("/v1/models").status_code == 401 for _ in range(8))
        assert bare.get("/v1/models", auth=("doc", "s3cret")).status_code == 200

        ui = client("10.0.0.4")
        for _ in range(5):
            assert ui.post("/login", data={"username": "doc", "password": "guess"}).status_code == 400
        assert ui.post("/login", data={"username": "doc", "password": "s3cret"}).status_code == 429
        assert ui.get("/v1/models", auth=("doc", "s3cret")).status_code == 429, "one count for the UI and the API"
        assert ui.get("/health").status_code == 200
    engine.close()


def test_the_throttle_window_passes_and_its_table_is_bounded():
    from fastapi.testclient import TestClient
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from serve.web_guard import AuthThrottle

    def check(request):
        ok = request.headers.get("authorization") == "right"
        return PlainTextResponse("ok" if ok else "no", status_code=200 if ok else 401)

    now = [1000.0]
    throttle = AuthThrottle(Starlette(routes=[Route("/v1/x", check)]), limit=5, window=60, max_clients=3,
                            clock=lambda: now[0])
    one = TestClient(throttle, client=("10.0.0.1", 1))
    for _ in range(5):
        assert one.get("/v1/x", headers={"Authorization": "wrong"}).status_code == 401
    assert one.get("/v1/x", headers={"Authorization": "right"}).headers["retry-after"] == "60"
    now[0] += 30
    assert one.get("/v1/x", headers={"Authorization": "right"}).headers["retry-after"] == "30"
    now[0] += 31  # the first failure has left the window
    assert one.get("/v1/x", headers={"Authorization": "right"}).status_code == 200
    for i in range(20):
        TestClient(throttle, client=(f"10.0.1.{i}", 1)).get("/v1/x", headers={"Authorization": "wrong"})
    assert len(throttle.failures) == 3


# ---- where the login comes from -----------------------------------------------------------------

def test_the_login_can_come_from_a_file_or_the_environment(tmp_path, capsys):
    from serve.cli import resolve_auth
    from vlm.cli import build_parser, main
    from vlm.errors import ConfigError

    parse = build_parser().parse_args
    login = tmp_path / "login"
    login.write_text("doc:s3 cret:x\n")
    assert resolve_auth(parse(["serve", "--auth-file", str(login)]), {}) == ("doc", "s3 cret:x")
    assert resolve_auth(parse(["serve"]), {"MEDVLM_AUTH": "doc:pw"}) == ("doc", "pw")
    assert resolve_auth(parse(["serve", "--auth", "a:b"]), {"MEDVLM_AUTH": "doc:pw"}) == ("a", "b")
    assert resolve_auth(parse(["serve"]), {}) is None
    with pytest.raises(ConfigError, match="not both"):
        resolve_auth(parse(["serve", "--auth", "a:b", "--auth-file", str(login)]), {})
    login.write_text("no password here\n")
    with pytest.raises(ConfigError, match="the first line of --auth-file .* must be USER:PASS"):
        resolve_auth(parse(["serve", "--auth-file", str(login)]), {})
    with pytest.raises(ConfigError, match="MEDVLM_AUTH must be USER:PASS"):
        resolve_auth(parse(["serve"]), {"MEDVLM_AUTH": "doc"})
    assert main(["serve", "--auth-file", str(tmp_path / "missing"), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "--auth-file" in err and "cannot read it" in err and "Traceback" not in err
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    assert "visible to other users" in " ".join(help_text.split())
