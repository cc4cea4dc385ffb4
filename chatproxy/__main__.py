"""`python -m chatproxy COMMAND`: see chatproxy/cli.py."""

from chatproxy.cli import main

main()
