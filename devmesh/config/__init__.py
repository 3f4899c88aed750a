"""devmesh.config"""
