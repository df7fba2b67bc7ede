"""``python -m tokenthin ...`` (also ``torchrun --nproc_per_node N -m tokenthin bench ...``): the command line."""

from .cli import main

main()
