"""devmesh.yaml to model: YAML with line marks, ${VAR} interpolation, the JSON Schema and
the semantic checks, with every problem reported as FILE:LINE:COL: key.path: message.
Imports only devmesh.core.
"""
