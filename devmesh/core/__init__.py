"""Pure decisions over plain data: the model, interpolation, semver ranges, the dependency
graph, the reconcile plan, health bookkeeping, host routing. No I/O, no clock, no
randomness (tests/test_architecture.py enforces it), so every decision is unit-testable.
"""
