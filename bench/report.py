"""The Markdown report of a run: tables side by side, then the targets met or missed."""
from pathlib import Path

from load import BODIES, OUTSIDE_AREA, PROFILE_RATE, TOKEN_RATE


def fmt(value, digits=2):
    return "–" if value is None else f"{value:.{digits}f}"


def render(r):
    out = []
    m = r["machine"]
    out.append(f"## ollama-gw benchmark ({r['started']}, `{r['command']}`)\n")
    out.append(f"Machine: {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, {m['os']}, "
               f"Python {m['python']}, nginx {m['nginx']}; "
               + ", ".join(f"{k} {v}" for k, v in m["packages"].items()) + ". "
               "Load generator, fake upstream, nginx and gateway all share these cores.\n")
    cal = r.get("calibration_ms") or []
    out.append("CPU speed check (a fixed pure-Python loop, best of 3; lower is faster): "
               + " → ".join(f"{c:.0f}" for c in cal) + " ms (start, before each group of "
               "non-streaming runs unless --quick, end); "
               f"other processes kept {r.get('background_load_pct', 0):.0f}% of the machine busy "
               "just before the start.\n")
    u = r["upstream_alone"]
    out.append(f"Fake upstream alone (wrk, 64 connections, /api/generate): **{u['rps']:.0f} "
               f"req/s**, p50 {u['p50_ms']:.2f} ms, {u['cpu_us_per_req']:.0f} µs CPU per "
               "request: far above anything the gateway reaches, so it is not the bottleneck.\n")
    rows = r["throughput"]
    by = {(x["path"], x["connections"], x["target"]): x for x in rows}
    out.append("### Non-streaming requests (wrk, `stream: false`, 32-token answers)\n")
    out.append("Targets: `direct` = straight to the fake upstream; `nginx` = nginx reverse "
               "proxy (2 workers, upstream keep-alive); `ref-flask` = gunicorn+gevent+Flask "
               "answering by itself (no upstream); `ref-relay` = the same plus a requests "
               "relay to the upstream (no key, no limit); `gw-sqlite`, `gw-postgres` = "
               "`ollama-gw serve --workers 2` with a key whose rate limit (100,000,000/minute) "
               "is counted in the database on every request. *added p50* = p50 minus direct's "
               "p50; *CPU µs/req* = CPU of the proxy's processes (and, for gw-postgres, of "
               "its PostgreSQL backends) per request, upstream excluded; *bg* = CPU used by "
               "processes outside the bench during the run (% of the machine).\n")
    out.append("| endpoint | conc. | target | req/s | p50 ms | p95 ms | p99 ms | errors | "
               "added p50 | × nginx req/s | CPU µs/req | bg |")
    out.append("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for x in rows:
        direct = by.get((x["path"], x["connections"], "direct"))
        nginx = by.get((x["path"], x["connections"], "nginx"))
        added = "" if x["target"] == "direct" or not direct else \
            f"{x['p50_ms'] - direct['p50_ms']:+.2f} ms"
        ratio = "" if x["target"] in ("direct", "nginx") or not nginx else \
            f"{x['rps'] / nginx['rps']:.2f}×"
        cpu = "" if x["target"] == "direct" or x["cpu_us_per_req"] is None else \
            f"{x['cpu_us_per_req']:.0f}"
        name = f"**{x['target']}**" if x["target"].startswith("gw-") else x["target"]
        out.append(f"| {x['path']} | {x['connections']} | {name} | {x['rps']:.0f} | "
                   f"{x['p50_ms']:.2f} | {x['p95_ms']:.2f} | {x['p99_ms']:.2f} | {x['errors']} "
                   f"| {added} | {ratio} | {cpu} | {x.get('foreign_cpu_pct', 0):.0f}% |")
    out.append("")
    s = r.get("streaming") or []
    if s:
        out.append(f"### Streaming (`/api/generate`, {TOKEN_RATE} tokens/s, one token per chunk)\n")
        out.append("TTFB: request sent → first token line received (the fake's first token "
                   f"comes {1000 / TOKEN_RATE:.0f} ms after the request). Chunk delay: each token "
                   "line's arrival minus when the fake upstream wrote it.\n")
        out.append("| conc. | streams × tokens | target | TTFB p50 | p95 | p99 | chunk delay "
                   "p50 | p95 | p99 | added TTFB p50 | added delay p50 / p99 | errors |")
        out.append("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        sby = {(x["concurrency"], x["target"]): x for x in s}
        for x in s:
            d = sby.get((x["concurrency"], "direct"))
            t, c = x["ttfb"], x["chunk_delay"]
            added_t = added_c = ""
            if d and x["target"] != "direct":
                added_t = f"{t['p50'] - d['ttfb']['p50']:+.2f} ms"
                added_c = (f"{c['p50'] - d['chunk_delay']['p50']:+.2f} / "
                           f"{c['p99'] - d['chunk_delay']['p99']:+.2f} ms")
            out.append(f"| {x['concurrency']} | {x['streams']} × {x['tokens']} | {x['target']} | "
                       f"{t['p50']:.2f} | {t['p95']:.2f} | {t['p99']:.2f} | {c['p50']:.2f} | "
                       f"{c['p95']:.2f} | {c['p99']:.2f} | {added_t} | {added_c} | "
                       f"{x['errors']} |")
        out.append("")
    sc = r.get("scale") or []
    if sc:
        out.append(f"### Scale: slow streams held by one gevent worker (SQLite, one token every "
                   f"{sc[0]['slow_interval']:g} s)\n")
        out.append("| streams | all open after | held at once | completed (`done: true`) | "
                   "errors | worker restarts | worker RSS before → open | RSS per stream | "
                   "worker CPU while holding (of one core) |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for x in sc:
            out.append(f"| {x['streams']} | {x['open_seconds']:.1f} s | {x['held_at_measure']} | "
                       f"{x['completed']} | {x['errors']} | {x['worker_restarts']} | "
                       f"{x['rss_before_kib'] / 1024:.0f} → {(x['rss_open_kib'] or 0) / 1024:.0f}"
                       f" MiB | {fmt(x['kib_per_stream'], 1)} KiB | "
                       f"{fmt((x['worker_cpu_while_holding'] or 0) * 100, 0)} % |")
        out.append("")
    profiles = r.get("profiles") or {}
    p = profiles.get("gw-sqlite")
    ref = profiles.get("ref-relay")
    if p:
        u = p["under_load"]
        out.append("### Profile: py-spy on the workers under wrk -c16 /api/generate\n")
        out.append(f"gw-sqlite: {p['samples']} samples at {PROFILE_RATE} Hz ({u['rps']:.0f} "
                   f"req/s while sampled); raw stacks in `{Path(p['raw']).name}`"
                   + (f", ref-relay's in `{Path(ref['raw']).name}`" if ref else "")
                   + " (open with speedscope.app or flamegraph.pl). *%*: of the samples in "
                   "request handling, each in the first area its stack reaches. *µs/req*: "
                   "the processes' CPU per request while sampled (/proc), split in proportion "
                   "to all their samples (ref-relay reads its body inside Flask's own "
                   "work).\n")

        def row(label, share, gw_us, ref_us):
            """A table row; ref-relay's columns only when it was profiled."""
            return (f"| {label} | {share} | {gw_us} |"
                    + (f" {ref_us} | {gw_us - ref_us:+d} |" if ref else ""))

        out.append("| where the workers' time goes | gw-sqlite % | gw-sqlite µs/req |"
                   + (" ref-relay µs/req | gw − ref |" if ref else ""))
        out.append("|---|---:|---:|" + ("---:|---:|" if ref else ""))
        for k, v in [*p["areas"], (OUTSIDE_AREA, "")]:
            out.append(row(k, v, p["us_per_request"][k], ref and ref["us_per_request"][k]))
        out.append(row("**CPU per request**", "", p["cpu_us_per_request"],
                       ref and ref["cpu_us_per_request"]))
        out.append("")
        out.append("| top self time, gw-sqlite (function) | % | | self time by package | % |")
        out.append("|---|---:|---|---|---:|")
        libs = p["self_by_library"]
        for i, (k, v) in enumerate(p["self_top"][:10]):
            lib = f"{libs[i][0]} | {libs[i][1]}" if i < len(libs) else " | "
            out.append(f"| `{k}` | {v} | | {lib} |")
        out.append("")
    out.append("### Targets\n")
    out.extend(target_lines(r))
    out.append("")
    if r["notes"]:
        out.append("### Notes\n")
        out.extend(f"- {n}" for n in r["notes"])
        out.append("")
    return "\n".join(out)


def target_lines(r):
    """Issue 12's targets, each against ref-relay (the stack's own floor) or direct."""
    lines = []
    by = {(x["path"], x["connections"], x["target"]): x for x in r["throughput"]}
    gws = sorted({x["target"] for x in r["throughput"] if x["target"].startswith("gw-")})

    def verdict(ok):
        return "met" if ok else "missed"

    for path in BODIES:
        for gw in gws:
            for conc in (16, 64):
                ref, g = by.get((path, conc, "ref-relay")), by.get((path, conc, gw))
                if ref and g:
                    ratio = g["rps"] / ref["rps"]
                    lines.append(f"- throughput, {path}, concurrency {conc}, {gw}: {ratio:.2f}× "
                                 f"ref-relay (target ≥ 1.0×): {verdict(ratio >= 1.0)}")
            ref, g = by.get((path, 1, "ref-relay")), by.get((path, 1, gw))
            if ref and g:
                added = g["p50_ms"] - ref["p50_ms"]
                lines.append(f"- added p50 at concurrency 1 over ref-relay, {path}, {gw}: "
                             f"{added:+.2f} ms (target ≤ 0.1 ms): {verdict(added <= 0.1)}")
    streams = {(x["concurrency"], x["target"]): x for x in r.get("streaming") or []}
    for (conc, name), x in sorted(streams.items()):
        d = streams.get((conc, "direct"))
        if name == "direct" or d is None:
            continue
        ttfb = x["ttfb"]["p50"] - d["ttfb"]["p50"]
        chunk = x["chunk_delay"]["p99"] - d["chunk_delay"]["p99"]
        goal = 1 if conc == 1 else 10
        floor = " (the floor: no checks)" if name == "ref-relay" else ""
        lines.append(f"- streaming, {conc} at once, {name}{floor}: added TTFB p50 {ttfb:+.2f} ms "
                     f"(target ≤ {goal} ms): {verdict(ttfb <= goal)}; added chunk delay p99 "
                     f"{chunk:+.2f} ms (target ≤ 1 ms): {verdict(chunk <= 1)}")
    for path in BODIES:
        s, p = by.get((path, 64, "gw-sqlite")), by.get((path, 64, "gw-postgres"))
        if s and p:
            ratio = p["p95_ms"] / s["p95_ms"]
            lines.append(f"- PostgreSQL p95 at 64 connections on one key, {path}: {ratio:.1f}× "
                         f"SQLite's (target ≤ 2×): {verdict(ratio <= 2)}")
    for x in r.get("scale") or []:
        ok = x["errors"] == 0 and x["completed"] == x["streams"] and x["worker_restarts"] == 0 \
            and x["held_at_measure"] == x["streams"]
        per = x["kib_per_stream"]
        goal = ""
        if x["streams"] >= 10000:
            goal = (f"; {fmt(per, 1)} KiB each (target: 10,000 at ≤ 40 KiB): "
                    f"{verdict(ok and per is not None and per <= 40)}")
        lines.append(f"- {x['streams']} concurrent slow streams held by one worker: "
                     f"{'all held and completed' if ok else 'FAILED'} ({x['held_at_measure']} "
                     f"held, {x['completed']} completed, {x['errors']} errors){goal}")
    return lines
