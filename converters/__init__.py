"""Checkpoint converters (installed as ``tide_local.converters``)."""
