"""devmesh.db"""
