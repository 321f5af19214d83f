"""The data plane's only socket/asyncio code: listeners, relays, pools, TLS, sockopts."""
