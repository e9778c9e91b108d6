"""The ``evsam`` command line: one thin module per subcommand, assembled in ``app.py``."""
