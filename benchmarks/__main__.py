"""``python -m benchmarks [--quick] [--json FILE] [--plot FILE.png] ...``: see medcare_kernels.bench."""

from medcare_kernels.bench.__main__ import main

raise SystemExit(main())
