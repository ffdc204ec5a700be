"""Terminal chat app (installed as ``tide_local.tui``)."""
