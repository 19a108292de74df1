"""P-TAME."""
