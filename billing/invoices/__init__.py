"""Monthly invoices: lines and totals from rated usage (pure), their tables, numbering,
rendering (HTML and PDF from one template) and the Stripe sync."""
