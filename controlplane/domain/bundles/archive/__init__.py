"""Bundle archives (`.tar.zst`): inspection of untrusted input."""
