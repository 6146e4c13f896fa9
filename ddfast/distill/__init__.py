"""Distillers: one method per module (``ld``: label distillation)."""
