"""Tenants and projects: registration on first sight of their events."""
