"""The released adapter loads anywhere its base exists, on that base only, and says what it guarantees.

Also: where base models come from. A hub id that is not cached fails at once, without touching the
network, unless the site allowed downloads.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from secure_fedllm import BaseModelMismatchError, load_adapter
from secure_fedllm.adapters import SIDECAR
from secure_fedllm.config import ModelConfig, RunConfig
from secure_fedllm.errors import ConfigError
from secure_fedllm.federation import run
from secure_fedllm.models import load_tokenizer, model_source


@pytest.fixture(scope="module")
def released(tiny_model_dir, tmp_path_factory):
    config = RunConfig().with_overrides(
        [
            f'model.name="{tiny_model_dir}"',
            "federation.clients=3",
            "federation.rounds=1",
            "data.records_per_client=48",
            "data.max_length=160",
            "evaluation.heldout_records=8",
            "evaluation.generations=0",
            "privacy.expected_batch_size=8",
            "privacy.target_epsilon=4.0",
            "lora.r=4",
            "privacy.noise_seed=5",
            "privacy.accountant='rdp'",  # calibrates in milliseconds; the card names whichever is used
            "secure_aggregation.dropout_rate=0.0",
        ]
    )
    out = tmp_path_factory.mktemp("release") / "run"
    return run(config, out=out, progress=False)


def _logits(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer("Question 3? Answer")["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_adapter_loads_with_auto_peft_in_a_fresh_process_and_matches_load_adapter(released, tmp_path):
    model, tokenizer = load_adapter(released.out)
    expected = _logits(model, tokenizer)
    script = (
        "import sys, torch\n"
        "from peft import AutoPeftModelForCausalLM\n"
        "from transformers import AutoTokenizer\n"
        "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = torch.tensor([t('Question 3? Answer')['input_ids']])\n"
        "with torch.no_grad():\n"
        "    torch.save(m(input_ids=ids).logits, sys.argv[2])\n"
    )
    out = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", script, str(released.adapter), str(out)], check=True, capture_output=True)
    torch.testing.assert_close(torch.load(out), expected, atol=1e-5, rtol=1e-5)
    # The adapter changes the base's output (the comparison above is not base against base).
    base = model.get_base_model()
    with model.disable_adapter():
        assert not torch.allclose(_logits(base, tokenizer), expected, atol=1e-6)


def test_the_readme_notebook_snippet_generates(released):
    model, tokenizer = load_adapter(released.out)
    messages = [{"role": "user", "content": "Summarise the patient's last visit."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True), str)


def test_load_adapter_refuses_another_base(released, tmp_path):
    adapter = tmp_path / "adapter"
    subprocess.run(["cp", "-r", str(released.adapter), str(adapter)], check=True)
    load_adapter(adapter)  # control: the untouched copy loads
    sidecar = json.loads((adapter / SIDECAR).read_text())
    sidecar["base_sha256"] = "0" * 64
    (adapter / SIDECAR).write_text(json.dumps(sidecar))
    with pytest.raises(BaseModelMismatchError, match="not the base this adapter was trained on"):
        load_adapter(adapter)


def test_model_card_states_base_data_epsilon_delta_and_accountant(released):
    card = (released.adapter / "README.md").read_text()
    ledger_eps = released.epsilons
    for client, eps in ledger_eps.items():
        assert f"| {client} |" in card and f"{eps:.3f}" in card
    assert "Accountant `rdp`" in card and "neighbouring relation `replace`" in card
    assert "synthetic private-records generator" in card
    assert "10% chance that some unit of that client is not protected" in card
    assert (released.adapter / "base_config.json").exists() and (released.adapter / "tokenizer.json").exists()


def test_an_uncached_hub_id_fails_at_once_without_the_network(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache

    def no_network(*args, **kwargs):
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(ConfigError, match=r"not in the local Hugging Face cache.*model.allow_download=true"):
        load_tokenizer(ModelConfig(name="secure-fedllm-tests/no-such-model"))
    # Control: with downloads allowed the loader would go online (local_files_only is lifted).
    _, kwargs = model_source(ModelConfig(name="secure-fedllm-tests/no-such-model", allow_download=True))
    assert kwargs == {"local_files_only": False}


@pytest.mark.parametrize("name", ["./no/such/folder", "/tmp/secure-fedllm-missing/model", "a/b/c"])
def test_a_missing_folder_is_named_with_the_fix(name):
    with pytest.raises(ConfigError, match="no such folder"):
        model_source(ModelConfig(name=name))


def test_the_old_model_dtype_key_points_at_training_dtype():
    with pytest.raises(ConfigError, match=r"model\.dtype is now training\.dtype"):
        RunConfig.from_dict({"model": {"dtype": "bfloat16"}})
