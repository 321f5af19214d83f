"""x-request-id generation: valid RFC 4122 version 4 UUID strings."""

from __future__ import annotations

import re
import uuid

from isthmus.dataplane.http.conn_manager import request_id

_CANON = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_request_id_is_a_canonical_v4_uuid() -> None:
    for _ in range(2000):
        rid = request_id()
        assert _CANON.match(rid), rid
        u = uuid.UUID(rid)
        assert u.version == 4
        assert u.variant == uuid.RFC_4122
        assert str(u) == rid


def test_request_ids_are_random() -> None:
    ids = [request_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    # every random hex digit position varies (only the version nibble is fixed; the
    # variant digit takes 8-b)
    digits = [rid.replace("-", "") for rid in ids]
    for pos in range(32):
        seen = {d[pos] for d in digits}
        if pos == 12:
            assert seen == {"4"}
        elif pos == 16:
            assert seen == set("89ab")
        else:
            assert len(seen) > 8, pos
