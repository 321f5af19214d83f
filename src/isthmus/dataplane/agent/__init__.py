"""dataplane/agent: the pilot-agent role next to each proxy: workload certificate
fetch (``fetcher``), renewal (``rotator``), serving over SDS (``sds``) and as files
(``files``), composed in ``agent``."""
