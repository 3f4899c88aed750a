"""devmesh.agent"""
