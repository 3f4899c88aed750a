"""The mesh driver: team identity, discovery backends, the peer channel, and a node that
wires them with the pure parts of ``devmesh.core`` (``wire``, ``peers``, ``catalog``).

- ``identity``: the name-constrained team CA, the mesh secret, the node id, name and
  certificate, and the bundle that ``export`` writes and ``join`` installs.
- ``discovery``: the backend interface, UDP broadcast and static seeds; ``mdns``: DNS-SD.
- ``channel``: mutual-TLS contexts, the catalog handler, a standalone server, a bounded
  fetch client.
- ``node``: one node running all of the above; ``python -m devmesh.mesh`` runs it.

Like every driver it imports no other driver and not the agent (tests/test_architecture.py).
"""
