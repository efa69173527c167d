"""Where workers run: the backend protocol and its implementations (local processes today)."""
