"""In-memory wiring of two sans-IO engines for tests: bytes move until both are quiet."""

from __future__ import annotations


def pump(client, server, *, max_rounds: int = 10_000) -> tuple[list, list]:
    """Move bytes both ways until neither side has anything to send.

    Returns (events seen by the client, events seen by the server).
    """
    client_events: list = []
    server_events: list = []
    for _ in range(max_rounds):
        to_server = client.data_to_send()
        to_client = server.data_to_send()
        if not to_server and not to_client:
            return client_events, server_events
        if to_server:
            server_events.extend(server.receive_data(to_server))
        if to_client:
            client_events.extend(client.receive_data(to_client))
    raise AssertionError("engines kept talking: livelock?")
