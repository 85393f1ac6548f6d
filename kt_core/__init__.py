"""kt_core."""
