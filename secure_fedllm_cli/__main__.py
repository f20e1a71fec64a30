"""`python -m secure_fedllm_cli`: the same as the `secure-fedllm` console script."""

from __future__ import annotations

from . import main

raise SystemExit(main())
