"""Entry point: ``python -m benchmarks`` (see ``cli.py``)."""
from .cli import main

raise SystemExit(main())
