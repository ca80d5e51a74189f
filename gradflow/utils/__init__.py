"""Foundations every layer uses: atomic file writes (``io``), provenance (``provenance``), lazy exports."""
