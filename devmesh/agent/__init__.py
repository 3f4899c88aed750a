"""The daemon: one per user per machine. It owns the applied projects, runs the reconciler
loop, serves the control API on a Unix socket and wires the drivers (supervisor, proxy)
together; nothing below it imports it.
"""
