"""Prometheus metrics of one Ingress replica, served on its ``/metrics``.

They live here, not in ``app.py``, because Ray Serve pickles the ingress endpoints *by value*
(with copies of the globals they use); a module is always pickled by reference, so every
endpoint and the middleware count into the same registry. Each replica exports its own counts
(scrape each, or use Ray's cluster-wide ``serve_*`` metrics on Ray's metrics port)."""
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST
REGISTRY = CollectorRegistry()
REQUESTS = Counter("weightgen_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=REGISTRY)
LATENCY = Histogram("weightgen_http_request_seconds", "HTTP request latency", ["route"], registry=REGISTRY,
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
INFLIGHT = Gauge("weightgen_http_requests_in_flight", "HTTP requests being answered", registry=REGISTRY)
GENERATED = Counter("weightgen_models_generated", "weight sets returned (one per 200 from /v1/generate)",
                    ["generator", "arch"], registry=REGISTRY)
CANDIDATES = Counter("weightgen_candidates_sampled", "candidates sampled for best-of-n", ["generator"], registry=REGISTRY)
TIMEOUTS = Counter("weightgen_request_timeouts", "generate requests answered 408", registry=REGISTRY)


def exposition() -> bytes:
    return generate_latest(REGISTRY)


class MetricsMiddleware:
    """Pure ASGI: counts every response by route template (not the raw path, so random 404
    paths cannot blow up label cardinality) and status, and times it."""

    def __init__(self, asgi_app):
        self.app = asgi_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        INFLIGHT.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            INFLIGHT.dec()
            route = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(scope["method"], route, str(status[0])).inc()
            LATENCY.labels(route).observe(time.perf_counter() - t0)
