"""Rank-side code: suites of checks and job scripts that spawned ranks run (the test_*.py modules start them)."""
