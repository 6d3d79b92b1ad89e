"""Relational store: engine and sessions, the table metadata, the Alembic runner."""
