"""The wire protocol between usher's processes: TLS, frames and operations.

This package sits at the bottom of usher's layers with :mod:`usher.errors`: of
usher it imports only the errors, and the controller, the node managers and the
clients all build on it.
"""
