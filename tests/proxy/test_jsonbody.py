"""JsonBody: the same fields and verdicts whether a body is parsed whole or scanned."""
import json

import pytest

from app.proxy import jsonbody
from app.proxy.jsonbody import JsonBody

PAD = "P" * (jsonbody.INLINE_LIMIT + 10)  # makes any body large enough to be scanned

DOCUMENTS = [
    {"model": "llama3.2", "prompt": "hi"},
    {"model": "llama3.2", "messages": [{"role": "user", "content": 'a "quoted" \\ word'}]},
    {"Model": "x", "options": {"num_ctx": 4096, "stop": ["\n", "}"]}, "stream": False},
    {"name": "é ü \u2028", "keep_alive": -1, "format": None, "raw": True, "n": 1.5e10},
    {"input": [[1, 2], [3, [4, {"deep": "]}"}]]], "model": "nomic-embed-text"},
    {},
]


def scanned(document, **extra):
    """The document with a large field added in front, as raw bytes."""
    return json.dumps({"padding": PAD, **extra, **document}).encode()


@pytest.mark.parametrize("document", DOCUMENTS)
def test_a_scanned_body_has_the_fields_a_parsed_one_has(document):
    small, large = JsonBody(json.dumps(document).encode()), JsonBody(scanned(document))
    assert small.problem is None and large.problem is None
    assert small.payload == document
    assert large.payload == document  # `padding` is too large to decode
    assert large.field_names() == ["padding", *document]
    assert small.models == large.models


@pytest.mark.parametrize("document", DOCUMENTS)
def test_without_removes_a_field_in_any_case_and_keeps_everything_else(document):
    for raw in (json.dumps({**document, "ApiKey": "k"}).encode(),
                scanned(document, APIKEY="k")):
        kept = json.loads(JsonBody(raw).without("apikey"))
        assert {k: v for k, v in kept.items() if k != "padding"} == document


def test_without_leaves_a_body_that_lacks_the_field_untouched():
    raw = scanned({"model": "x"})
    assert JsonBody(raw).without("apikey") is raw


def test_a_later_duplicate_wins_as_in_go():
    body = JsonBody(b'{"model": "a", "padding": "' + PAD.encode() + b'", "model": "b"}')
    assert body.payload["model"] == "b"
    assert body.models == ["b", "b"]  # each occurrence is checked


def test_a_large_value_that_comes_later_hides_an_earlier_small_one():
    body = JsonBody(b'{"prompt": "short", "prompt": "' + PAD.encode() + b'"}')
    assert "prompt" not in body.payload


@pytest.mark.parametrize("raw, problem", [
    (b'{"a": 1', "not valid JSON"),
    (b'{"a": 1}}', "not valid JSON"),
    (b'{"a": [1, 2}', "not valid JSON"),
    (b'{"a" 1}', "not valid JSON"),
    (b'{"a": tru}', "not valid JSON"),
    (b'{"a": 1,}', "not valid JSON"),
    (b'{a: 1}', "not valid JSON"),
    (b'{"a": "\\"}', "not valid JSON"),
    (b'{"a": ' + b"[" * 2000 + b"]" * 2000 + b"}", "not valid JSON"),
    (b'["a"]', "must be a JSON object"),
    (b'"a"', "must be a JSON object"),
    (b'{"model": 5}', "'model' must be a string"),
])
def test_malformed_bodies_are_refused_whether_parsed_or_scanned(raw, problem):
    padded = raw.replace(b"{", b'{"padding": "' + PAD.encode() + b'", ', 1) \
        if raw.startswith(b"{") and raw != b"{a: 1}" else raw + b" " * len(PAD)
    for body in (JsonBody(raw), JsonBody(padded)):
        assert body.problem is not None and problem in body.problem, (raw[:40], body.problem)


def test_escaped_backslashes_before_a_quote_end_a_large_string():
    raw = b'{"padding": "' + PAD.encode() + b'\\\\", "model": "m"}'
    assert JsonBody(raw).payload == {"model": "m"}


def test_an_empty_body_is_no_payload_and_no_problem():
    body = JsonBody(b"  \n")
    assert (body.payload, body.problem, body.models) == (None, None, [])


@pytest.mark.parametrize("document", DOCUMENTS)
def test_rewritten_sets_and_drops_fields_whether_parsed_or_scanned(document):
    changes = {"options": {"num_ctx": 2048}, "stream_options": {"include_usage": True}}
    for raw in (json.dumps({**document, "Stream_Options": 1}).encode(),
                scanned(document, Stream_Options=1)):
        out = json.loads(JsonBody(raw).rewritten(changes, drop=("apikey",)))
        expected = {k: v for k, v in document.items() if k.lower() not in ("options",)}
        assert {k: v for k, v in out.items() if k != "padding"} == {**expected, **changes}


def test_an_empty_body_rewritten_holds_only_the_changes():
    assert json.loads(JsonBody(b"").rewritten({"a": 1})) == {"a": 1}


@pytest.mark.parametrize("escaped, refused", [
    ("\\ud800", True),  # an unpaired surrogate: no database encodes it
    ("llama\\udfff", True),
    ("\\ud800\\u0041", True),  # a high surrogate without its low half
    ("a\\u0000b", True),  # NUL: PostgreSQL's text holds none
    ("a\\u001fb", True),
    ("a\\u007fb", True),
    ("\\ud83d\\ude00:latest", False),  # a surrogate pair is one character
    ("a\\u0020b~\\u0080", False),  # space, tilde and what follows DEL are names' business
])
@pytest.mark.parametrize("field", ["model", "NAME"])
def test_a_model_name_with_a_control_character_or_unpaired_surrogate_is_refused(
        escaped, refused, field):
    raw = f'{{"{field}": "{escaped}", "prompt": "hi"}}'.encode()
    for body in (JsonBody(raw), JsonBody(scanned(json.loads(raw)))):
        if refused:
            assert body.problem == (f"'{field}' is not a model name: it holds a control "
                                    "character or an unpaired surrogate")
        else:
            assert body.problem is None and body.models == [json.loads(raw)[field]]
