"""Reading, authenticating and relaying a request: the request path from a client to Ollama.

Owns the gateway's forwarding (gateway), who the caller is (auth), the request body as it
arrives (request_body, jsonbody), the relay of the answer and its stream (relay, sse),
sending one request to every upstream (fanout), CORS, the options and request shapes of
the gateways it replaces (compat_options), which paths a key may open (doors), and which
requests run on ollama.com and who may send them (cloud).

May import: app.admission, app.upstreams, app.accounting, app.keys, app.webhooks,
app.store and the base (app.config, app.errors, app.limits, app.cooperative, app.redact,
app.metrics). Not app.routes, app.ui, app.serving or create_app: they import this.
"""
