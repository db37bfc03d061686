"""Small shared utilities (device choice, atomic writes)."""
