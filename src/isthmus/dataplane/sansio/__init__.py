"""Sans-IO protocol engines for the data plane: bytes in, events out.

``events`` is the shared vocabulary; ``http1`` (httptools) and ``http2`` (h2) are the
HTTP engines for both downstream (server) and upstream (client) sides; ``hbone`` is
HTTP/2 CONNECT tunnelling on top of ``http2``; ``detect`` sniffs the first bytes of a
connection (HTTP/2 preface, HTTP/1 method, TLS ClientHello). No module here does I/O
or keeps a clock: the asyncio code in ``dataplane/io`` feeds them and owns timeouts.
"""
