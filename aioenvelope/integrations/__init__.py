"""Optional web-framework integrations (each needs its framework's extra installed)."""

__all__: list[str] = []
