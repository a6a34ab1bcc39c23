"""TLS contexts of a cluster node: the cluster port is always mutual TLS."""

from __future__ import annotations

import ssl

from mqd.config import Config


def cluster_server_context(config: Config) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=config.tls.ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls.cert, config.tls.key)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def cluster_client_context(config: Config) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.tls.ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls.cert, config.tls.key)
    return context
