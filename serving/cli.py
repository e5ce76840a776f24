"""``weightgen serve``: run the HTTP application on a local Ray instance (blocking).

The local Ray instance is closed to the network: its node address is 127.0.0.1, so GCS, raylet,
object manager and workers listen on loopback only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray's
switch for a single-machine instance; without it Ray binds the host's network address), and Ray's
token authentication stays on (the default for a local instance in this Ray version; the token is
``~/.ray/auth_token`` or ``$RAY_AUTH_TOKEN_PATH``). Only the HTTP proxy listens on ``--host``, with
the caps of ``serving/proxy.py``. One exception Ray does not let us change: each Serve replica's
inter-deployment gRPC server binds ``[::]:0`` (hard-coded in Ray Serve 2.60); it checks the token.
A Ray client of this instance needs ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` too, or it dials the
host's address.
"""
from __future__ import annotations

import argparse
import os
import signal

LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node address 127.0.0.1: every Ray port on loopback
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "serving.proxy:setup",  # the proxy's header and body caps
}


def cmd_serve(a: argparse.Namespace) -> int:
    if a.address is None:  # a local instance we start: its processes inherit this environment
        for k, v in LOCAL_RAY_ENV.items():
            os.environ.setdefault(k, v)
    import ray
    from ray import serve

    from serving.app import build_app

    ctx = ray.init(address=a.address, include_dashboard=False)
    serve.start(http_options={"host": a.host, "port": a.port})
    args = {"home": os.environ.get("WEIGHTGEN_HOME")} if os.environ.get("WEIGHTGEN_HOME") else {}
    if a.torch_threads:
        args["torch_threads"] = a.torch_threads
    args["request_timeout_s"] = a.request_timeout
    # each replica reserves --torch-threads CPUs; more than the machine has would never schedule
    args["generator_replicas"] = a.replicas or max(1, min((os.cpu_count() or 1) // max(a.torch_threads, 1), 4))

    def _stop(signum, frame):  # SIGTERM (kill, docker stop) shuts down like Ctrl-C: no orphaned Ray processes
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    print(f"Ray at {ctx.address_info['gcs_address']}", flush=True)
    print(f"weightgen serving on http://{a.host}:{a.port} (POST /v1/generate, GET /v1/archs, /healthz); Ctrl-C stops",
          flush=True)
    try:
        serve.run(build_app(args), name="weightgen", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    s = subparsers.add_parser("serve", help="serve generated weights over HTTP (Ray Serve)")
    s.add_argument("--host", default="127.0.0.1", help="bind address of the HTTP proxy (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local one on 127.0.0.1)")
    s.add_argument("--replicas", type=int, default=0,
                   help="generator replicas (default: cores / --torch-threads, up to 4)")
    s.add_argument("--torch-threads", type=int, default=1, help="torch threads per generator replica")
    s.add_argument("--request-timeout", type=float, default=60.0, help="seconds before a generate request gets 408")
    s.set_defaults(fn=cmd_serve)
    return s
