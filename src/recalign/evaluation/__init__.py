"""Evaluation layer: metrics, protocols, result records and reports, shared by every method."""
