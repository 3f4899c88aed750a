"""Reserved for discovery and the peer channel (a later issue); empty until then so the
layout of DESIGN.md and its import contracts hold from the start.
"""
