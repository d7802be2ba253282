"""/metrics shows traffic figures: only SOFTGOODS_METRICS_ALLOW networks (default loopback) or a
bearer token read it, and behind nginx the address that counts is the client's, not nginx's."""
import ipaddress
import urllib.error
import urllib.request

import pytest

from app.config import load_settings


def status(sc, remote: str = "127.0.0.1", **headers) -> int:
    return sc.get("/metrics", environ_base={"REMOTE_ADDR": remote}, headers=headers).status_code


def test_metrics_are_served_to_loopback_only_by_default(sc):
    assert status(sc) == 200 and status(sc, "::1") == 200
    refused = sc.get("/metrics", environ_base={"REMOTE_ADDR": "203.0.113.7"})
    assert refused.status_code == 403 and "softgoods_bytes_sent_total" not in refused.text
    # An unconfigured proxy on loopback forwarding someone else: that someone is unknown, refused.
    assert status(sc, **{"X-Forwarded-For": "203.0.113.7"}) == 403
    assert status(sc, **{"Forwarded": "for=203.0.113.7"}) == 403


@pytest.mark.config(METRICS_ALLOW=(ipaddress.ip_network("10.0.0.0/8"),), METRICS_TOKEN="s3cret-metrics-token")
def test_an_allow_list_and_a_bearer_token_open_metrics(sc):
    assert status(sc, "10.1.2.3") == 200
    assert status(sc, "127.0.0.1") == 403  # the list replaces the default
    assert status(sc, "203.0.113.7", Authorization="Bearer s3cret-metrics-token") == 200
    assert status(sc, "203.0.113.7", Authorization="bearer s3cret-metrics-token") == 200
    for wrong in ("Bearer s3cret", "Bearer s3cret-metrics-token-and-more", "Basic s3cret-metrics-token", ""):
        assert status(sc, "203.0.113.7", Authorization=wrong) == 403, wrong


def test_with_proxyfix_the_forwarded_client_address_is_the_one_checked(env):
    from app.extensions import db
    from sidecar import create_sidecar

    app = create_sidecar({"TESTING": True}, env={**env, "SOFTGOODS_PROXY_COUNT": "1"})
    client = app.test_client()
    assert client.get("/metrics", headers={"X-Forwarded-For": "203.0.113.7"}).status_code == 403
    assert client.get("/metrics", headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 200
    if "softgoods_fast_files" in app.extensions:
        app.extensions["softgoods_fast_files"].close()
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


def test_metrics_settings_are_read_once_and_checked(tmp_path):
    base = {"SOFTGOODS_INSTANCE_DIR": str(tmp_path)}
    settings = load_settings({**base, "SOFTGOODS_METRICS_ALLOW": "10.0.0.0/8, 192.168.1.5",
                              "SOFTGOODS_METRICS_TOKEN": "tok"})
    assert [str(n) for n in settings["METRICS_ALLOW"]] == ["10.0.0.0/8", "192.168.1.5/32"]
    assert settings["METRICS_TOKEN"] == "tok"
    assert load_settings({**base, "SOFTGOODS_METRICS_ALLOW": ""})["METRICS_ALLOW"] == ()
    with pytest.raises(SystemExit, match="SOFTGOODS_METRICS_ALLOW must be"):
        load_settings({**base, "SOFTGOODS_METRICS_ALLOW": "10.0.0.0/8,not-an-address"})


def fetch(url: str, **headers) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.backends("sqlite")
def test_behind_nginx_the_proxy_address_does_not_open_metrics(sidecar, nginx, backend_name):
    server = sidecar(threads=4, SOFTGOODS_METRICS_TOKEN="s3cret-metrics-token")
    front = nginx("accel", upstream=server.url)
    assert fetch(server.url + "/metrics") == 200  # a scraper on the sidecar host itself
    assert fetch(front.url + "/metrics") == 403  # nginx connects from loopback, but for someone else
    assert fetch(front.url + "/metrics", Authorization="Bearer s3cret-metrics-token") == 200
