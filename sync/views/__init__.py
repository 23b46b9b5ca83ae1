"""What the commands show people: data for ``--json`` and text for a terminal; cli.py prints it."""
