"""Whether a request may run now: rate limits and quotas, the fair queue, model policy.

Owns ratelimit (limits and quotas per key), fair_queue (an upstream's slots shared fairly
between keys), holders (slots left by workers that died) and model_policy (per-key caps
on models and options).

May import: app.keys, app.webhooks, app.store and the base. Not app.proxy or anything
above it; app.upstreams and app.accounting sit beside it.
"""
