"""devmesh.dashboard"""
