"""The ``recalign`` command. Each ``cmd_*.py`` module in this package adds one subcommand group."""
