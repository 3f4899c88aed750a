"""devmesh: a peer-to-peer dev mesh for sharing local services."""

__version__ = "0.1.0"
