"""`python -m kdcache.cli` (and `torchrun -m kdcache.cli`) runs the `kdcache` command."""

from kdcache.cli import main

main()
