"""Helpers shared by the tests (pytest puts tests/ on the import path: `from helpers.X import ...`)."""
