"""Small shared helpers (tables, atomic files, ...)."""
