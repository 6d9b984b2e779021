"""The `renkei` command. Each `*_cmd.py` module here adds one group of subcommands."""
