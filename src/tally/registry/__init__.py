"""Registration: tenants, applications and API keys (the operator's side)."""
