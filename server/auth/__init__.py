"""Users, API tokens and every authorization decision."""
