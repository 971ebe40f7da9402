"""Kernel conformance: every attention backend against the float64 CPU oracle.

`ci.matrix` holds the cases as data, `ci.batches` builds each case's poisoned
paged batch, `ci.conformance` runs them (`python -m ci.conformance --help`).
"""
