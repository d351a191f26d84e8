"""The ``flatness`` command line: thin commands that parse, validate, call the library, print."""
