"""Developer tools, each one command: python dev/<tool>.py --help."""
