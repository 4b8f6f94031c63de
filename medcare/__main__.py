"""``python -m medcare <command> ...``: the ``medcare`` command line (see :mod:`medcare.cli`)."""

from medcare.cli import main

raise SystemExit(main())
