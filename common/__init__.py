"""What every layer shares and nothing else: the user-error types (``errors``) and atomic file writes (``files``)."""
