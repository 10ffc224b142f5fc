"""Helpers shared by the tests and the rank-side suites: the harness, exact references, the op matrix, network namespaces, plugin cases."""
