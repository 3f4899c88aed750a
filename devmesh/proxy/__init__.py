"""devmesh.proxy"""
