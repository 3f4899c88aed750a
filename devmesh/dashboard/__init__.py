"""The live web dashboard: static files and one WebSocket feed, served by the agent.

A driver like the proxy: it imports no other driver and no agent code. The agent hands it a
``source.Source`` (``agent.dashboardhost``) and routes devmesh.localhost to its listener.
"""
