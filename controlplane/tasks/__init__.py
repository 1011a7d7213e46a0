"""Background loops: offline sweep, retention pruning."""
