"""devmesh.core"""
