"""Images and transcriptions: the model named in a JSON body or a multipart form is
checked against the key's allow-list (a missing one is a 400), the body is relayed as it
came, and the request is recorded with its model (Ollama reports no tokens for them)."""
import gzip

import pytest

from app.errors import BadRequest
from app.proxy.form import STEP, VALUE_LIMIT, field_values
from app.store.models import UsageRecord
from tests.accounting.test_usage import label
from tests.conftest import auth_header

FORM_TYPE = "multipart/form-data; boundary=XyZ"
AUDIO = b"RIFF\x24\x00\x00\x00WAVEfmt "


def form(*fields, file=("file", "a.wav", AUDIO)):
    """A form with the given (name, value) fields and a file part, as httpx writes one."""
    parts = [b'--XyZ\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
             % (name.encode(), value.encode()) for name, value in fields]
    if file:
        name, filename, data = file
        parts.append(b'--XyZ\r\nContent-Disposition: form-data; name="%s"; filename="%s"\r\n'
                     b"Content-Type: audio/wav\r\n\r\n%s\r\n"
                     % (name.encode(), filename.encode(), data))
    return b"".join(parts) + b"--XyZ--\r\n"


def reached(fake, path):
    return [r for r in fake.requests if r.path.split("?")[0] == path]


def records(client):
    assert client.application.extensions["usage"].write_pending()
    return list(UsageRecord.select().order_by(UsageRecord.id))


@pytest.fixture
def limited(make_key):
    return make_key(models="llama3.2")[0]


def transcribe(client, secret, body, path="/v1/audio/transcriptions", **headers):
    return client.post(path, data=body, headers={**auth_header(secret),
                                                 "Content-Type": FORM_TYPE, **headers})


@pytest.mark.parametrize("path", ["/v1/audio/transcriptions", "/v1/images/edits"])
def test_a_forms_model_is_checked_and_the_form_relayed_unchanged(client, fake, limited, path):
    body = form(("model", "llama3.2"), ("language", "en"))
    answer = transcribe(client, limited, body, path)
    received = reached(fake, path)[-1]
    assert received.body == body
    assert received.headers["content-type"] == FORM_TYPE
    assert received.headers["content-length"] == str(len(body))
    if path == "/v1/audio/transcriptions":
        assert answer.status_code == 200
        assert answer.get_json() == {"text": "word0 word1 word2 word3 word4"}
    else:  # Ollama's edits took JSON: its own 400 for a form, passed through
        assert answer.status_code == 400

    refused = transcribe(client, limited, form(("model", "qwen2.5")), path)
    assert refused.status_code == 403
    assert "may not use model 'qwen2.5'" in refused.get_json()["error"]["message"]
    assert len(reached(fake, path)) == 1


@pytest.mark.parametrize("body, why", [
    (form(("model", "llama3.2"), ("model", "qwen2.5")), "a second model field"),
    (form(("prompt", "llama3.2"), ("model", "qwen2.5")), "the model after another field"),
    (form(("model", "llama3.2"), file=("model", "", b"qwen2.5")),
     "a part with an empty filename: Go's form value"),
    (form(("model", "llama3.2"), file=("model", "m.txt", b"qwen2.5")), "a file called model"),
    (form(("model", "qwen2.5"), ("model", "llama3.2")), "the first of two: Go's FormValue"),
])
def test_every_model_part_is_checked(client, fake, limited, body, why):
    answer = transcribe(client, limited, body)
    assert answer.status_code == 403, why
    assert "may not use model 'qwen2.5'" in answer.get_json()["error"]["message"]
    assert reached(fake, "/v1/audio/transcriptions") == []


def test_the_querys_model_is_checked_too(client, fake, limited):
    """Go's FormValue falls back on the query's `model` when the form has none."""
    answer = transcribe(client, limited, form(("model", "llama3.2")),
                        "/v1/audio/transcriptions?model=qwen2.5")
    assert answer.status_code == 403
    assert reached(fake, "/v1/audio/transcriptions") == []


@pytest.mark.parametrize("body, problem", [
    (form(("language", "en")), "'model' is required"),
    (form(("model", "")), "'model' is required"),
    (form(("model", "llama3.2"))[:-12], "malformed"),
    (form(("model", "llama3.2"))[:-9], "multipart/form-data body"),
    (form(("model", "a" * 5000)), "longer than 4096 bytes"),
    (form(("model", "llama\x013.2")), "control character"),
    (form(("model", "llama3.2")).replace(b'name="model"', b"name*=UTF-8''model"),
     "RFC 2231"),
    (form(("model", "llama3.2")).replace(b'name="model"', b'name="x"; name="model"'),
     "names a parameter twice"),
    (form(("model", "llama3.2")).replace(b'name="model"', b'name="x"; NAME="model"'),
     "names a parameter twice"),  # parameter names are case-insensitive, to Go too
    (form(("model", "llama3.2")).replace(b'name="model"', b'name*0="model"'), "RFC 2231"),
    # a file part is a form value to Go (empty filename): its name must be as clear
    (form(("model", "llama3.2"), file=("model", "", b"qwen2.5")).replace(
        b'name="model"; filename=""', b"name*=UTF-8''model; filename=\"\""), "RFC 2231"),
    (form(("model", "llama3.2"), file=("model", "", b"qwen2.5")).replace(
        b'name="model"; filename=""', b'name="x"; filename=""; name="model"'),
     "names a parameter twice"),
    (form(("model", ""), ("model", "llama3.2")), "'model' is required"),  # Go takes the first
    (form(("model", "llama3.2")).replace(b"llama3.2", b"llama\xff3.2"), "not UTF-8"),
])
def test_a_form_without_a_clear_model_gets_400_in_openais_shape(client, fake, limited, body,
                                                                  problem):
    answer = transcribe(client, limited, body)
    assert answer.status_code == 400
    error = answer.get_json()["error"]
    assert error["type"] == "invalid_request_error"
    assert problem in error["message"]
    assert fake.requests == []


def test_a_model_field_is_read_up_to_exactly_its_limit():
    at = "a" * VALUE_LIMIT
    assert field_values(form(("model", at)), FORM_TYPE) == [at]
    with pytest.raises(BadRequest, match=f"longer than {VALUE_LIMIT} bytes"):
        field_values(form(("model", at + "a")), FORM_TYPE)


def test_a_model_split_across_the_parsers_steps_is_read_whole():
    """The body reaches the parser STEP bytes at a time: a value it sees in two pieces
    (wherever about the seam the parser cuts it) is one value."""
    start = form(("language", ""), ("model", "llama3.2")).rindex(b"llama3.2")
    for at in range(STEP - 24, STEP + 1):
        body = form(("language", "x" * (at - start)), ("model", "llama3.2"))
        assert body.index(b"llama3.2", at - 1) == at
        assert field_values(body, FORM_TYPE) == ["llama3.2"], at


@pytest.mark.parametrize("content_type", ['multipart/form-data; boundary="XyZ"',
                                          "multipart/form-data; boundary=XyZ; charset=utf-8",
                                          "Multipart/Form-Data; Boundary=XyZ"])
def test_the_boundary_is_read_as_a_media_type_parameter(client, fake, limited, content_type):
    body = form(("model", "llama3.2"))
    answer = transcribe(client, limited, body, **{"Content-Type": content_type})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert reached(fake, "/v1/audio/transcriptions")[-1].body == body
    refused = transcribe(client, limited, form(("model", "qwen2.5")),
                         **{"Content-Type": content_type})
    assert refused.status_code == 403


def test_a_transcription_must_be_a_form(client, fake, limited):
    answer = client.post("/v1/audio/transcriptions", json={"model": "llama3.2"},
                         headers=auth_header(limited))
    assert answer.status_code == 400
    assert "takes a multipart/form-data body" in answer.get_json()["error"]["message"]
    assert fake.requests == []


def test_a_compressed_form_is_checked_and_relayed_decompressed(client, fake, limited):
    body = form(("model", "llama3.2"))
    answer = transcribe(client, limited, gzip.compress(body), **{"Content-Encoding": "gzip"})
    assert answer.status_code == 200
    assert reached(fake, "/v1/audio/transcriptions")[-1].body == body
    refused = transcribe(client, limited, gzip.compress(form(("model", "qwen2.5"))),
                         **{"Content-Encoding": "gzip"})
    assert refused.status_code == 403


@pytest.mark.parametrize("path, extra", [("/v1/images/generations", {}),
                                         ("/v1/images/edits", {"image": "aGk="})])
def test_images_check_the_json_model_and_need_one(client, fake, limited, path, extra):
    body = {"model": "llama3.2", "prompt": "a cat", **extra}
    answer = client.post(path, json=body, headers=auth_header(limited))
    assert answer.status_code == 200
    assert answer.get_json()["data"][0]["b64_json"]
    assert reached(fake, path)[-1].json() == body

    refused = client.post(path, json={**body, "model": "qwen2.5"}, headers=auth_header(limited))
    assert refused.status_code == 403
    missing = client.post(path, json={"prompt": "a cat", **extra}, headers=auth_header(limited))
    assert missing.status_code == 400
    assert f"'model' is required on {path}" in missing.get_json()["error"]["message"]
    assert len(reached(fake, path)) == 1


def test_media_requests_are_recorded_with_their_model_and_no_tokens(client, fake, make_key):
    secret, key = make_key()
    answers = [transcribe(client, secret, form(("model", "llama3.2"))),
               client.post("/v1/images/generations", json={"model": "qwen2.5:0.5b",
                                                            "prompt": "a cat"},
                           headers=auth_header(secret))]
    for answer in answers:
        assert answer.status_code == 200
        answer.close()  # the record is taken as the server closes the answer
    rows = [r for r in records(client) if r.key_id == key.id]
    assert [(label(r.endpoint_id), label(r.model_id), r.status) for r in rows] == [
        ("/v1/audio/transcriptions", "llama3.2:latest", 200),
        ("/v1/images/generations", "qwen2.5:0.5b", 200)]
    assert [(r.prompt_tokens, r.completion_tokens) for r in rows] == [(None, None)] * 2
