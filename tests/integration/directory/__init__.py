"""Tests of usher.directory against a real slapd."""
