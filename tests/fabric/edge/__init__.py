"""Tests of the fabric's edge: authentication, TLS, rate limits, metrics, ops HTTP."""
