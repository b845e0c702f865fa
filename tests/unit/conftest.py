"""Unit tests: no process, no socket server, no database. A test that needs one goes to
tests/integration, where the PostgreSQL fixtures live."""
