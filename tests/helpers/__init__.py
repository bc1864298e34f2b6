"""Helper programs the tests run as separate processes (invoked by path)."""
