"""Command-line entry points; each module parses its arguments and calls the library."""
