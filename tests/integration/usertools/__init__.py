"""Tests of the usher_* tools, run as processes against a real slapd."""
