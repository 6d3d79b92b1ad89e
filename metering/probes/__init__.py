"""Uptime probes of provider endpoints (the scheduler job)."""
