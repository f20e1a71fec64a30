"""The Flower app of our job: `server_app` and `client_app`, for `flwr run` (simulation or deployment).

Run config keys (`[tool.flwr.app.config]`, or `flwr run ... --run-config`): `config` (path of a
RunConfig TOML, "" for the defaults), `out` (the run folder), `train-timeout` and `stage-timeout`
(seconds), `signed-roster` (a `protocols.SignedRoster` JSON file that a roster authority, not the
server, signed; the server only relays it to the sites). Node config keys: `partition-id` (which
client the node is), and optionally `config`, `state-dir`, `site-policy` (the node's `SitePolicy`
file: the security parameters it accepts, its pinned roster and identity key; default
`<state-dir>/client-XXXX/policy.toml` when present), `data-path` (with `data-format`, `data-fields`,
`data-heldout-fraction`: the site's own records), and without a policy `secagg-identity-key`,
`secagg-allow-insecure`. Security settings come only from the node's own config and files, never
from the run config, which the server writes.

Importing this module loads Flower and our protocol code only; torch loads when a node first trains.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from pydantic import ValidationError

from protocols import SignedRoster

from ..config import RunConfig
from ..errors import ConfigError
from .client import handle_evaluate, handle_evaluation_offer, handle_ledger, handle_offer, handle_train
from .client_mod import secure_aggregation_mod

__all__ = ["client_app", "load_signed_roster", "server_app"]

client_app = ClientApp(mods=[secure_aggregation_mod])
server_app = ServerApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return handle_train(msg, context)


@client_app.query("offer")
def _offer(msg: Message, context: Context) -> Message:
    return handle_offer(msg, context)


@client_app.query("ledger")
def _ledger(msg: Message, context: Context) -> Message:
    return handle_ledger(msg, context)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return handle_evaluate(msg, context)


@client_app.query("evaluation")
def _evaluation_offer(msg: Message, context: Context) -> Message:
    return handle_evaluation_offer(msg, context)


@server_app.main()
def _main(grid: Grid, context: Context) -> None:
    from .server import run_on_grid

    cfg = context.run_config
    path = str(cfg.get("config", "") or "")
    config = RunConfig.from_file(path) if path else RunConfig()
    roster = str(cfg.get("signed-roster", "") or "")
    run_on_grid(
        grid,
        config,
        out=str(cfg.get("out", "runs/flower")),
        train_timeout=float(cfg.get("train-timeout", 3600.0)),  # type: ignore[arg-type]
        stage_timeout=float(cfg.get("stage-timeout", 120.0)),  # type: ignore[arg-type]
        signed_roster=load_signed_roster(roster) if roster else None,
    )


def load_signed_roster(path: str | Path) -> SignedRoster:
    """The roster file the authority published (JSON of `protocols.SignedRoster`, keys in hex).

    Raises:
        ConfigError: unreadable or not a signed roster (names the file). Whether the authority really
            signed it is checked by every site, against the authority key in its own policy.
    """
    try:
        return SignedRoster.model_validate_json(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"signed-roster {path}: {exc}; pass the roster file the authority published") from exc
    except ValidationError as exc:
        raise ConfigError(
            f"signed-roster {path}: not a signed roster ({exc.errors()[0]['msg']}); pass the file "
            "SignedRoster.sign(...).model_dump_json() wrote"
        ) from exc
