"""Command functions of the ``clv`` console script, one module per command."""
