"""Command-line tools over the library: `python -m app <tool>` (see `app/__main__.py`)."""
