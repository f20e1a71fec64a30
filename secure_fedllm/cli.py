"""`secure-fedllm`: the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .demo import SMOLLM2_QV_LORA_R16, DemoConfig, run_demo
from .errors import SecureFedLLMError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secure-fedllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="one secure-aggregation round over simulated clients, with dropouts")
    demo.add_argument("--clients", type=int, default=20)
    demo.add_argument("--dimension", type=int, default=SMOLLM2_QV_LORA_R16)
    demo.add_argument("--protocol", choices=["secagg", "secagg+"], default="secagg+")
    demo.add_argument("--dropout", type=float, default=0.1, help="fraction of clients that drop mid-round")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        lines: list[str] = []
        config = DemoConfig(
            clients=args.clients,
            dimension=args.dimension,
            protocol=args.protocol,
            dropout=args.dropout,
            seed=args.seed,
        )
        run_demo(config, out=lines)
        print("\n".join(lines))
    except SecureFedLLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
