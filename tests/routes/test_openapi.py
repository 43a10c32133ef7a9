"""/openapi.json describes every route, /docs and /redoc work offline, and answers match.

The document is written by hand (app/routes/openapi.py); these tests keep it honest: every
Flask route is in it, it is valid OpenAPI 3.1, and schemathesis sends generated
requests to every operation, with a user key and with an admin key, against the fake
Ollama, checking that nothing answers 500 and every answer is one the document allows.
"""
import re
from html.parser import HTMLParser

import hypothesis
import pytest
import schemathesis
from openapi_spec_validator import validate
from schemathesis import checks

from app.routes import openapi
from tests.conftest import auth_header

# Changing or revoking the key the run itself uses would turn the rest of the run into
# 401s and 403s: those two are exercised in tests/routes/test_admin_api.py instead.
SELF_HARM = {("DELETE", "/api/keys/{ident}"), ("POST", "/api/keys/{ident}/rotate")}


def template(rule):
    """`/api/keys/<ident>` and `/api/keys/{ident}` both as `/api/keys/{}`."""
    return re.sub(r"<[^>]+>|\{[^}]+\}", "{}", rule)


def test_the_document_is_valid_openapi_3_1():
    document = openapi.document()
    validate(document)
    assert document["openapi"].startswith("3.1")


def test_every_route_the_gateway_serves_is_documented(app):
    documented = {template(path): ops for path, ops in openapi.document()["paths"].items()}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/ui/"):
            continue  # the web dashboard: HTML pages and forms for people, not an API
        path = template(rule.rule)
        assert path in documented, f"{rule.rule} is not in /openapi.json"
        methods = {m.lower() for m in rule.methods} - {"head", "options"}
        if "put" not in methods:  # catch-alls accept every method to answer 405 for some
            missing = methods - set(documented[path])
            assert not missing, f"{rule.rule}: {missing} not documented"


def test_the_document_is_served_without_a_key(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.get_json()["paths"]["/api/keys"]["post"]["tags"] == ["Admin"]


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls, self.inline_scripts, self._in_script = [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.urls += [attrs[a] for a in ("src", "href") if attrs.get(a)]
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline_scripts.append(data)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_assets_the_gateway_serves(client, page):
    response = client.get(page)
    assert response.status_code == 200 and response.mimetype == "text/html"
    links = _Links()
    links.feed(response.get_data(as_text=True))
    assert links.urls and not links.inline_scripts
    for url in links.urls:
        assert "//" not in url and not url.startswith("/"), f"{url} is not a local asset"
        asset = client.get("/" + url)  # relative to /docs or /redoc: from the root
        assert asset.status_code == 200, url
        assert asset.mimetype in ("text/javascript", "application/javascript", "text/css")
        body = asset.get_data(as_text=True)
        if url.endswith("-init.js"):
            assert '"openapi.json"' in body  # the spec comes from this gateway
    assert client.get("/docs/assets/VENDORED.md").status_code == 404


# What makes a browser fetch a URL written in a page, a script or a style sheet: an
# element's src, CSS url() and @import, fetch() and importScripts(); an absolute URL there
# (https://, http:// or //host) would load something from elsewhere.
FETCHED_FROM_ELSEWHERE = re.compile(
    r"""(?:\bsrc\s*[:=]\s*|\bsrcset\s*[:=]\s*|\burl\(\s*|@import\s+(?:url\(\s*)?|"""
    r"""\bfetch\(\s*|\bimportScripts\(\s*)["'`]?(?:https?:)?//[^"'`)\s]*""")  # not URL()


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_and_their_assets_fetch_nothing_from_elsewhere(client, page):
    html = client.get(page).get_data(as_text=True)
    links = _Links()
    links.feed(html)
    bodies = {page: html} | {url: client.get("/" + url).get_data(as_text=True)
                             for url in links.urls}
    assert len(bodies) > 2
    found = {url: FETCHED_FROM_ELSEWHERE.findall(body) for url, body in bodies.items()}
    assert {url: hits for url, hits in found.items() if hits} == {}


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_a_trailing_slash_redirects_to_the_page(client, page):
    answer = client.get(page + "/")
    assert (answer.status_code, answer.headers["Location"]) == (301, page)
    assert client.get(page + "/", follow_redirects=True).status_code == 200


def test_the_tab_icon_is_served_without_a_key(client):
    answer = client.get("/favicon.ico")
    assert (answer.status_code, answer.mimetype) == (200, "image/svg+xml")
    assert answer.get_data(as_text=True).startswith("<svg ")


def test_swagger_ui_calls_no_outside_validator(client):
    assert "validatorUrl: null" in client.get("/docs/assets/swagger-init.js").get_data(
        as_text=True)


@pytest.fixture
def callers(make_key):
    """A user key and an admin key, made once per test run."""
    return {role: auth_header(make_key(role, role=role, rate_limit="none")[0])
            for role in ("user", "admin")}


def not_a_500(ctx, response, case):
    """502/503/504 are documented answers about Ollama or the database; 500 is a bug."""
    if response.status_code == 500:
        raise AssertionError(f"500 from {case.method} {case.path}: {response.text[:300]}")


def test_every_operation_answers_as_documented(app, callers, fake):
    api = schemathesis.openapi.from_wsgi("/openapi.json", app)
    checked = set()
    for result in api.get_all_operations():
        operation = result.ok()

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=10, deadline=None, derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck),
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
        def answers_as_documented(case):
            for role, headers in callers.items():
                if role == "admin" and (case.method.upper(), case.path) in SELF_HARM:
                    continue
                case.call_and_validate(headers=headers, checks=[
                    not_a_500, checks.status_code_conformance,
                    checks.content_type_conformance, checks.response_schema_conformance])

        answers_as_documented()
        checked.add((operation.method.upper(), operation.path))
    assert ("POST", "/api/generate") in checked and ("GET", "/api/admin/audit") in checked
