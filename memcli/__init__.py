"""memcli: memory-augmented language models behind one command-line tool."""

__version__ = "0.1.0"
