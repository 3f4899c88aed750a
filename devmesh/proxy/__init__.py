"""The local HTTP/HTTPS/WebSocket reverse proxy (h11, wsproto), its local CA and access
log. A driver: the agent feeds it route tables and edges; see docs/proxy.md.
"""
