"""The local mesh runtime: a "cluster" where the node and each pod are network namespaces.

Decide, then do:
- ``plan``: manifests -> ``ClusterPlan`` (pods, IPs, ClusterIPs, DNS, env, injection); pure.
- ``images``: image names -> commands on this machine.
- ``inject``: ``SidecarInjector`` (init capture rules + the proxy container).
- ``kubeproxy``: ClusterIP -> pod DNAT as iptables-restore text; pure.
- ``dns``: per-pod /etc/hosts and resolv.conf text (written to /etc/netns/<ns>/); pure.
- ``network``: node/pod namespaces, bridge, veths through a ``Runner`` (recorded in tests).
- ``netnsutil``: sockets made inside another network namespace (setns in a thread).
- ``supervisor``: containers as processes (restart with backoff, logs, readiness).
- ``forward``: host 127.0.0.1:PORT -> an address inside the node namespace.
- ``state``: the state dir (JSON state file, logs, pidfile, lock).
- ``daemon``: the background process ``isthmus up`` starts; ``cli/runtime.py`` the commands.
"""
