"""controlplane/xds: serving xDS, in Envoy protos only (never the config model).

* ``types``     — type URLs, short names (CDS/EDS/LDS/RDS/SDS), push order, extra types
* ``snapshot``  — ``XdsSnapshot`` (immutable, per-resource hashes, ``consistent()``, ``diff``)
* ``cache``     — ``SnapshotCache`` per node id, watches, ``SnapshotProvider``
* ``server``    — ``XdsServer``: gRPC ADS, SotW and delta (+ single-type services)
* ``status``    — per-connection sync status (``/debug/syncz``, ``isthmus proxy-status``)
* ``debug``     — ``DebugServer``: ``/debug/syncz``, ``/debug/config_dump?proxyID=``
* ``debounce``  — ``Debouncer``: merge bursts of change events into one push
* ``wire``, ``tasks`` — hand-assembled response bytes; task helper keeping references

This package imports nothing here on purpose: translation imports ``snapshot`` and must
not pull in grpc (only ``server`` imports it).
"""
