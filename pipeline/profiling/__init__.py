"""Profiles: well profiles normalized, selected and compared (and imported ones)."""
