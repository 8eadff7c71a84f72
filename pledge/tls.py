"""One TLS context per process for the HTTP clients of the service and the signer.

Building one loads the CA bundle (about 20 ms here), and `httpx.Client` builds its own for
every client it makes, even for a plain-http URL: a watcher's scanning child paid it before
its first block, and clients made per call (a price fetch, a screening request) paid it each
time. The context is httpx's own default, built once for each `trust_env`; it is read-only
once built, so threads and forked children share it.
"""

from __future__ import annotations

import functools
import ssl


@functools.cache
def client_tls(trust_env: bool = True) -> ssl.SSLContext:
    """httpx's default verifying context (`trust_env`: honour SSL_CERT_FILE/SSL_CERT_DIR)."""
    import httpx

    return httpx.create_ssl_context(trust_env=trust_env)
