"""devmesh.mesh"""
