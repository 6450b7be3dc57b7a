"""`python -m diyllm ...` (also what `torchrun -m diyllm train ...` runs)."""

from diyllm.cli import main

raise SystemExit(main())
