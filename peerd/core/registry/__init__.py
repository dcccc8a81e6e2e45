"""The registry: unique names and process groups (see state.py)."""
