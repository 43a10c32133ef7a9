"""Reference points: the gateway's own stack (gunicorn + gevent + Flask) doing less.

bench/run.py serves these with the same gunicorn settings as `ollama-gw serve`
(gevent workers, 10,000 connections each) so the table shows what each layer costs:

  reference_app:hello   Flask answers a fixed Ollama-like JSON; no upstream, no key
  reference_app:relay   Flask + one requests.Session relaying to the upstream, streamed
                        (stream=True, raw chunks), as app/upstreams/client.py does; no key, no
                        rate limit, no database

BENCH_UPSTREAM is the upstream's base URL (relay only).
"""
import os

from flask import Flask, Response, request

ANSWER = (b'{"model":"llama3.2","created_at":"2025-01-01T00:00:00.000000Z","response":'
          b'"word0 word1 word2 word3 word4 word5 word6 word7 word8 word9 word10 word11 '
          b'word12 word13 word14 word15 word16 word17 word18 word19 word20 word21 word22 '
          b'word23 word24 word25 word26 word27 word28 word29 word30 word31 ","done":true,'
          b'"done_reason":"stop","total_duration":78906,"load_duration":1000000,'
          b'"prompt_eval_count":5,"prompt_eval_duration":2000000,"eval_count":32,'
          b'"eval_duration":1}')

hello = Flask("hello")


@hello.route("/api/<path:subpath>", methods=["POST"])
def hello_answer(subpath):
    request.get_data()
    return Response(ANSWER, mimetype="application/json; charset=utf-8")


relay = Flask("relay")
_session = []


def session():
    # Made in the worker, after gevent has patched the socket module.
    if not _session:
        import requests
        from requests.adapters import HTTPAdapter

        s = requests.Session()
        s.trust_env = False
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=256, max_retries=0)
        s.mount("http://", adapter)
        _session.append(s)
    return _session[0]


@relay.route("/api/<path:subpath>", methods=["POST"])
def relay_answer(subpath):
    upstream = session().post(
        os.environ["BENCH_UPSTREAM"] + "/api/" + subpath, data=request.get_data(),
        headers={"Content-Type": request.content_type or "application/json"},
        stream=True, allow_redirects=False, timeout=(5, 600))

    def body():
        try:
            yield from upstream.raw.stream(64 * 1024, decode_content=False)
        finally:
            upstream.close()

    return Response(body(), status=upstream.status_code,
                    content_type=upstream.headers.get("Content-Type"), direct_passthrough=True)
