"""The science engine: neural-collapse metrics and unconstrained-feature-model solvers.

Depends on torch, numpy and the standard library only, so it can be used from a
notebook without the service.
"""
