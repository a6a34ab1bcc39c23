"""Shared by the tests that run a local cluster (`mqd.launcher`)."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator

from mqd import launcher

STOP_ORDER = ["frontend", "backend", "metadata"]


def tls_for(manifest: launcher.Manifest) -> ssl.SSLContext:
    """A client TLS context trusting the cluster's client CA."""
    return ssl.create_default_context(cafile=str(manifest.client_ca))


@contextlib.contextmanager
def running(manifest: launcher.Manifest, timeout_s: float = 90) -> Iterator[launcher.Manifest]:
    """Start every node; stop them all on exit. The start is inside the try: a start
    that fails half way leaves no node running."""
    try:
        launcher.start_cluster(manifest, timeout_s=timeout_s)
        yield manifest
    finally:
        launcher.stop_nodes(manifest, manifest.in_order(STOP_ORDER))
