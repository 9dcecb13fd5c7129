"""Formats one deploy-storm line from a `dream check --json` report on stdin.

argv: NAME MODE STEADY_P99_US
"""
import json
import sys

d = json.load(sys.stdin)
name, mode, steady = sys.argv[1], sys.argv[2], float(sys.argv[3] or 0)
lat, err = d["latency"], d["errors"]
reset = err["connect_reset"] + err["read_reset"]
timeout = err["connect_timeout"] + err["read_timeout"]
ms = lambda us: us / 1000
print(
    f"{name:<9} {mode:<11} errors {d['error_total']:>6} (refused {err['connect_refused']}, "
    f"reset {reset}, timeout {timeout}) mixed {d['mixed']:>4}  "
    f"p50 {ms(lat['p50_us']):.2f}  p99 {ms(lat['p99_us']):.2f}  p99.9 {ms(lat['p999_us']):.2f}  "
    f"max {ms(lat['max_us']):.1f} ms | steady p99 {ms(steady):.2f} ms, "
    f"ratio {lat['p99_us'] / max(steady, 1):.2f} | {d['requests_per_s']:.0f} req/s"
)
