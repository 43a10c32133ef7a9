"""Compressed request bodies: inflated within max_body_bytes (a bomb gets 413 within a
memory bound), checked like any body, and forwarded decompressed with their new length."""
import gzip
import json
import tracemalloc
import zlib

import pytest
import zstandard

from app.proxy import content_encoding
from tests.conftest import auth_header

LIMIT = 4 * 1024 * 1024
MIB = 1024 * 1024


def zstd(data):
    return zstandard.ZstdCompressor(level=3).compress(data)


def zstd_window(log, data):
    """`data` in a zstd frame of unknown size whose header asks for a 2**log byte window."""
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=log)
    writer = zstandard.ZstdCompressor(compression_params=params).compressobj()
    return writer.compress(data) + writer.flush()


def zstd_zeros(mib):
    """A zstd stream of `mib` MiB of zeros (frames of 1 GiB at most, joined)."""
    writer = zstandard.ZstdCompressor(level=19).compressobj()
    frame_mib = min(mib, 1024)
    frame = b"".join([writer.compress(bytes(MIB)) for _ in range(frame_mib)] + [writer.flush()])
    return frame * (mib // frame_mib)


def gzip_zeros(mib):
    writer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return b"".join([writer.compress(bytes(MIB)) for _ in range(mib)] + [writer.flush()])


@pytest.fixture(scope="module")
def bombs():
    return {"zstd": zstd_zeros(10 * 1024), "gzip": gzip_zeros(1024)}  # 10 GiB, 1 GiB


def sent(fake, path):
    return [r for r in fake.requests if r.path.split("?")[0] == path][-1]


def post(client, path, body, coding, secret=None, **headers):
    compressed = {"zstd": zstd, "gzip": gzip.compress, "x-gzip": gzip.compress}[coding](body)
    return client.post(path, data=compressed, headers={
        **(auth_header(secret) if secret else {}), "Content-Type": "application/json",
        "Content-Encoding": coding.upper() if coding == "zstd" else coding, **headers})


@pytest.mark.parametrize("coding", ["zstd", "gzip"])
def test_a_bomb_gets_413_within_the_memory_bound(make_client, make_key, fake, bombs, coding):
    client = make_client(max_body_bytes=LIMIT)
    secret, _ = make_key()
    bomb = bombs[coding]
    assert len(bomb) < LIMIT
    tracemalloc.start()
    try:
        answer = client.post("/v1/responses", data=bomb, headers={
            **auth_header(secret), "Content-Encoding": coding})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert answer.status_code == 413
    assert f"limit of {LIMIT} bytes (max_body_bytes), decompressed" in \
        answer.get_json()["error"]["message"]
    assert peak <= LIMIT + MIB, f"peak {peak / MIB:.1f} MiB"
    assert fake.requests == []


@pytest.mark.parametrize("coding", ["zstd", "gzip"])
def test_the_limit_holds_exactly_at_the_decompressed_size(make_client, make_key, fake, coding):
    client = make_client(max_body_bytes=LIMIT)
    secret, _ = make_key()
    head = b'{"model": "llama3.2", "input": "hi", "pad": "'
    at_limit = head + b"x" * (LIMIT - len(head) - 2) + b'"}'
    assert len(at_limit) == LIMIT
    assert post(client, "/v1/responses", at_limit, coding, secret).status_code == 200
    assert sent(fake, "/v1/responses").body == at_limit
    over = at_limit[:-2] + b'x"}'
    answer = post(client, "/v1/responses", over, coding, secret)
    assert answer.status_code == 413
    assert len(fake.requests) == 1


@pytest.mark.parametrize("coding", ["zstd", "gzip", "x-gzip"])
@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions", "/v1/responses",
                                  "/v1/messages"])
def test_a_compressed_body_is_checked_and_forwarded_decompressed(client, make_key, fake,
                                                                  coding, path):
    secret, _ = make_key(models="llama3.2")
    body = {"model": "llama3.2", "stream": False, "input": "hi",
            "messages": [{"role": "user", "content": "hi"}],
            **({"max_tokens": 5} if path == "/v1/messages" else {})}
    raw = json.dumps(body).encode()
    answer = post(client, path, raw, coding, secret)
    assert answer.status_code == 200, answer.get_data()
    received = sent(fake, path)
    assert received.json() == body
    assert "content-encoding" not in received.headers
    assert received.headers["content-length"] == str(len(received.body))

    refused = post(client, path, json.dumps({**body, "model": "qwen2.5"}).encode(), coding,
                   secret)
    assert refused.status_code == 403
    assert "may not use model 'qwen2.5'" in json.dumps(refused.get_json())
    assert len([r for r in fake.requests if r.path.split("?")[0] == path]) == 1


def test_the_body_is_rewritten_after_decompression(client, make_key, fake):
    """The gateway's own changes (here: asking for a stream's usage) apply to the inflated
    body, and the key in a legacy `apikey` field is found inside it and stripped."""
    secret, _ = make_key()
    body = {"model": "llama3.2", "stream": True, "apikey": secret,
            "messages": [{"role": "user", "content": "hi"}]}
    answer = post(client, "/v1/chat/completions", json.dumps(body).encode(), "zstd")
    assert answer.status_code == 200
    received = sent(fake, "/v1/chat/completions").json()
    assert "apikey" not in received
    assert received["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("coding", ["zstd", "gzip"])
def test_the_unauthenticated_bound_applies_to_the_decompressed_size(make_client, make_key,
                                                                     fake, coding):
    """A legacy `apikey` in the body is looked for in at most max_unauthenticated_body_bytes,
    inflated: a small compressed body cannot make the gateway inflate more for a stranger."""
    limit = 64 * 1024
    client = make_client(max_unauthenticated_body_bytes=limit)
    secret, _ = make_key()
    head = json.dumps({"model": "llama3.2", "apikey": secret, "prompt": ""})[:-2].encode()
    fits = head + b"x" * (limit - len(head) - 2) + b'"}'
    assert len(fits) == limit
    assert post(client, "/api/generate", fits, coding).status_code == 200
    answer = post(client, "/api/generate", fits[:-2] + b'x"}', coding)
    assert answer.status_code == 401
    assert "max_unauthenticated_body_bytes" in answer.get_json()["error"]
    assert len(fake.requests) == 1


@pytest.mark.parametrize("coding, data, problem", [
    ("zstd", b"not zstd at all", "not valid zstd data"),
    ("gzip", b"not gzip at all", "not valid gzip data"),
    ("zstd", zstd(b'{"model": "llama3.2"}')[:-3], "truncated"),
    ("zstd", zstd(b'{"model": "llama3.2"}' + b" " * 200)[:8], "truncated"),
    ("gzip", gzip.compress(b'{"model": "llama3.2"}', mtime=0)[:-3], "truncated"),
    ("gzip", gzip.compress(b'{"model": "llama3.2"}', mtime=0) + b"junk", "not valid gzip data"),
    # cut where the frame tracker waits for no bytes of a header or a block: right after a
    # frame's header (magic, descriptor, content size), and after the next frame's magic
    ("zstd", zstd(b'{"model": "llama3.2"}')[:6], "truncated"),
    ("zstd", zstd(b'{"model": "llama3.2"}') + zstd(b" ")[:4], "truncated"),
    # a frame asking for a 16 MiB window: Ollama's decoder allows 8 MiB, and so does this one
    ("zstd", zstd_window(24, b'{"model": "llama3.2"}'), "too much memory"),
])
def test_malformed_compressed_data_gets_400(client, make_key, fake, coding, data, problem):
    secret, _ = make_key()
    answer = client.post("/v1/responses", data=data, headers={
        **auth_header(secret), "Content-Encoding": coding})
    assert answer.status_code == 400
    assert problem in answer.get_json()["error"]["message"]
    assert fake.requests == []


@pytest.mark.parametrize("coding", ["br", "deflate", "gzip, zstd", "compress"])
@pytest.mark.parametrize("path", ["/api/chat", "/v1/responses"])
def test_other_encodings_get_415_in_the_routes_shape(client, make_key, fake, coding, path):
    secret, _ = make_key()
    answer = client.post(path, data=b"{}", headers={**auth_header(secret),
                                                    "Content-Encoding": coding})
    assert answer.status_code == 415
    error = answer.get_json()["error"]
    message = error["message"] if path.startswith("/v1/") else error
    assert f"Content-Encoding {coding!r} is not supported" in message
    assert fake.requests == []


def test_joined_gzip_members_and_zstd_frames_are_one_body(client, make_key, fake):
    secret, _ = make_key()
    body = b'{"model": "llama3.2", "prompt": "hi", "stream": false}'
    for coding, data in [("gzip", gzip.compress(body[:20]) + gzip.compress(body[20:])),
                         ("zstd", zstd(body[:20]) + zstd(body[20:])),
                         # a skippable frame between, and a frame with a checksum
                         ("zstd", zstd(body[:20]) + b"\x5a\x2a\x4d\x18\x03\x00\x00\x00abc"
                          + zstandard.ZstdCompressor(write_checksum=True).compress(body[20:]))]:
        answer = client.post("/api/generate", data=data, headers={
            **auth_header(secret), "Content-Encoding": coding})
        assert answer.status_code == 200
        assert sent(fake, "/api/generate").body == body


@pytest.mark.parametrize("coding, header", [("gzip", "gzip, identity"),
                                            ("zstd", "identity, zstd"),
                                            ("zstd", "identity,zstd,identity")])
def test_identity_beside_one_coding_is_that_coding(client, make_key, fake, coding, header):
    secret, _ = make_key()
    body = b'{"model": "llama3.2", "prompt": "hi", "stream": false}'
    data = zstd(body) if coding == "zstd" else gzip.compress(body)
    answer = client.post("/api/generate", data=data, headers={
        **auth_header(secret), "Content-Encoding": header})
    assert answer.status_code == 200, answer.get_data()
    received = sent(fake, "/api/generate")
    assert received.body == body
    assert "content-encoding" not in received.headers


def test_identity_and_an_empty_body_are_left_alone(client, make_key, fake):
    secret, _ = make_key()
    assert client.get("/api/tags", headers={**auth_header(secret),
                                            "Content-Encoding": "zstd"}).status_code == 200
    body = b'{"model": "llama3.2", "prompt": "hi", "stream": false}'
    assert client.post("/api/generate", data=body, headers={
        **auth_header(secret), "Content-Encoding": "identity"}).status_code == 200
    assert sent(fake, "/api/generate").headers["content-encoding"] == "identity"


@pytest.mark.parametrize("coding", ["zstd", "gzip"])
def test_inflating_asks_for_no_more_than_is_left(coding):
    """Each piece is at most what is left of the limit (so inflating stops one byte past
    it) and one STEP."""
    data = zstd_zeros(64) if coding == "zstd" else gzip_zeros(64)
    pieces, room = [], [3 * MIB + 5]
    for piece in content_encoding.inflate([data], coding, lambda: room[0]):
        pieces.append(len(piece))
        room[0] -= len(piece)
        if room[0] <= 0:
            break
    assert room[0] == 0 and sum(pieces) == 3 * MIB + 5
    assert max(pieces) == content_encoding.STEP
