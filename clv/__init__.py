"""clv: streaming customer-lifetime-value service (entry points, settings, local stack)."""

from __future__ import annotations

__version__ = "0.1.0"
