"""Every relational table of the service on one metadata (for Alembic and the tests).

Importing the model modules registers their tables on `billing.db.Base`.
"""

from __future__ import annotations

import billing.budgets.models
import billing.invoices.models
import billing.prices.models  # noqa: F401
import metering.auth.models
import metering.tenants.models  # noqa: F401
from billing.db import Base

metadata = Base.metadata
