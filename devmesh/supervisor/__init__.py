"""devmesh.supervisor"""
