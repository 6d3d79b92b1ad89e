"""Monthly invoicing: the month's close (run, finalize, late usage), preview, audit,
rendering and Stripe routes, and the scheduler job. The rules live in billing.invoices."""
