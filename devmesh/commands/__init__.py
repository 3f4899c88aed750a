"""One module per CLI command; each exposes register(subparsers). Stdlib-only imports at top."""
