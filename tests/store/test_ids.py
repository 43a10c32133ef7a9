"""Ids in URLs and commands: ASCII digits within the database's range, else 404 or one line."""
import pytest

from app.store.ids import MAX_ID, parse_id
from tests.conftest import auth_header
from tests.ui.test_ui import csrf

# Each was a 500, a traceback or another key's row: too large for the database, digits
# int() reads but no one types (superscript, full-width), signs, zero.
HOSTILE = [str(MAX_ID + 1), "99999999999999999999999", "²", "１", "١", "+1", "-1", "0",
           "1" + "0" * 400]


@pytest.mark.parametrize("text, value", [
    ("1", 1), ("007", 7), (str(MAX_ID), MAX_ID), (str(MAX_ID + 1), None), ("²", None),
    ("１", None), ("", None), (" 1", None), ("1.0", None), ("0", None), ("-1", None)])
def test_parse_id(text, value):
    assert parse_id(text) == value


@pytest.fixture
def admin(make_key):
    return make_key("ops", role="admin")


@pytest.mark.parametrize("ident", HOSTILE)
@pytest.mark.parametrize("method, suffix", [("GET", ""), ("PATCH", ""), ("DELETE", ""),
                                            ("POST", "/rotate")])
def test_admin_api_answers_404_for_what_is_not_an_id(client, admin, ident, method, suffix):
    secret, first = admin
    assert first.id == 1  # so `１` would have found it
    response = client.open(f"/api/keys/{ident}{suffix}", method=method,
                           headers=auth_header(secret), json={"name": "x"})
    assert response.status_code == 404, response.data
    assert "error" in response.get_json()
    assert client.get("/api/keys/1", headers=auth_header(secret)).get_json()["name"] == "ops"


@pytest.mark.parametrize("ident", HOSTILE)
@pytest.mark.parametrize("method, path", [
    ("GET", "/ui/keys/{}"), ("POST", "/ui/keys/{}"), ("GET", "/ui/keys/{}/revoke"),
    ("POST", "/ui/webhooks/{}/test"), ("POST", "/ui/webhooks/deliveries/{}/retry")])
def test_dashboard_answers_404_for_what_is_not_an_id(make_client, admin, ident, method, path):
    browser = make_client(ui=True)
    browser.environ_base["HTTP_SEC_FETCH_SITE"] = "same-origin"
    assert browser.post("/ui/signin", data={"key": admin[0]}).status_code == 302
    assert browser.get("/ui/keys/1").status_code == 200
    data = {"csrf": csrf(browser)} if method == "POST" else None
    response = browser.open(path.format(ident), method=method, data=data)
    assert response.status_code == 404


@pytest.mark.parametrize("ident", ["99999999999999999999999", str(MAX_ID + 1), "²", "１"])
@pytest.mark.parametrize("command", [("keys", "show"), ("keys", "revoke", "--yes"),
                                     ("keys", "rotate", "--yes"), ("keys", "update", "--name=x"),
                                     ("webhooks", "remove", "--yes"), ("webhooks", "test"),
                                     ("webhooks", "deliveries"), ("usage", "--key")])
def test_cli_refuses_what_is_not_an_id_in_one_line(runner, admin, ident, command):
    result = runner(*command[:2], ident, *command[2:])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ")
    assert result.output.strip().count("\n") == 0, result.output
