"""``python -m cryptoplane``: the same as the ``cryptoplane`` command."""

from cryptoplane.cli.main import main

main()
