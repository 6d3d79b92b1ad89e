"""Billing domain: price book, rating, budgets and invoices.

Pure domain logic with its own persistence; it never imports `metering`, which wires it
into the service. Money is `decimal.Decimal` end to end.
"""
