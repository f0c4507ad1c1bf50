"""Pushing to and loading from the Hub, against the in-process FakeHub (no network)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer

from hf_tuning.hub import push_output_dir, select_upload_files
from tests.helpers.fake_hub import FAKE_TOKEN, FakeHub  # the fake_hub fixture comes from conftest.py
from tests.helpers.tiny import tiny_llama, tiny_tokenizer

CARD = """---
license: apache-2.0
base_model: tiny-llama
library_name: peft
tags:
- hf_tuning
- dt3
---
# tiny adapter

Trained with hf_tuning.
"""

INPUT_IDS = torch.tensor([[1, 5, 9, 12, 7, 30, 2]])


def lora_model() -> PeftModel:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    return get_peft_model(tiny_llama(layers=2), config).eval()


def write_output_dir(folder: Path, model: PeftModel) -> Path:
    """An output_dir as a staged run leaves it: deliverables plus checkpoints and training state."""
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    (folder / "README.md").write_text(CARD)
    (folder / "dt_stages.json").write_text(json.dumps({"variant": "dt3", "stages": []}))
    (folder / "dt_timeline.png").write_bytes(b"\x89PNG\r\n\x1a\nfake")
    (folder / "eval_results.json").write_text(json.dumps({"eval_loss": 1.5}))
    (folder / "training_args.bin").write_bytes(b"pickled args with hub_token")
    (folder / ".dt_stages.json.abc123.tmp").write_text("{")
    for junk in ("checkpoint-5", "stage-0/checkpoint-3", "runs/Jan01"):
        (folder / junk).mkdir(parents=True)
        (folder / junk / "optimizer.pt").write_bytes(b"state")
        (folder / junk / "adapter_model.safetensors").write_bytes(b"old")
    (folder / "rng_state.pth").write_bytes(b"rng")
    return folder


def test_select_upload_files_skips_training_state(tmp_path: Path) -> None:
    folder = write_output_dir(tmp_path / "out", lora_model())
    names = [p.as_posix() for p in select_upload_files(folder)]
    assert "adapter_model.safetensors" in names and "README.md" in names and "dt_timeline.png" in names
    assert not [n for n in names if n.startswith(("checkpoint-", "stage-", "runs/", "."))]
    assert "training_args.bin" not in names and "rng_state.pth" not in names


def test_push_adapter_and_load_it_back(fake_hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = lora_model()
    folder = write_output_dir(tmp_path / "out", model)

    caplog.set_level(logging.DEBUG)
    url = push_output_dir(folder, "user/tiny-adapter", private=True, token=FAKE_TOKEN)
    assert "tiny-adapter" in caplog.text and FAKE_TOKEN not in caplog.text

    repo = fake_hub.repo("user/tiny-adapter")
    assert url.startswith(f"{fake_hub.endpoint}/user/tiny-adapter/commit/") and url.oid == repo.sha
    assert repo.files() == [p.as_posix() for p in select_upload_files(folder)]
    assert "adapter_config.json" in repo.files() and "dt_stages.json" in repo.files()
    assert not [f for f in repo.files() if f.startswith(("checkpoint-", "stage-", "runs/")) or "optimizer" in f]
    (create,) = fake_hub.requests_to("POST", "/api/repos/create")
    asked = create.json()  # huggingface_hub 2.x sends visibility="private", older ones private=true
    assert asked["name"] == "tiny-adapter" and (asked.get("visibility") == "private" or asked.get("private") is True)
    assert repo.private
    assert create.headers["authorization"] == f"Bearer {FAKE_TOKEN}"
    (commit,) = fake_hub.requests_to("POST", "/commit/main")
    assert commit.headers["authorization"] == f"Bearer {FAKE_TOKEN}"

    card = (repo.folder / "README.md").read_text()
    front_matter = yaml.safe_load(card.split("---")[1])
    assert front_matter["library_name"] == "peft" and "dt3" in front_matter["tags"]

    base = tiny_llama(layers=2).eval()
    with torch.no_grad():
        base_logits = base(INPUT_IDS).logits
        loaded = PeftModel.from_pretrained(base, "user/tiny-adapter").eval()
        assert torch.equal(loaded(INPUT_IDS).logits, model(INPUT_IDS).logits)
        assert not torch.equal(loaded(INPUT_IDS).logits, base_logits)  # the adapter is not a no-op
    tokenizer = AutoTokenizer.from_pretrained("user/tiny-adapter")
    assert tokenizer("check the tyre pressure").input_ids == tiny_tokenizer()("check the tyre pressure").input_ids


def test_push_again_updates_the_repo(fake_hub: FakeHub, tmp_path: Path) -> None:
    folder = write_output_dir(tmp_path / "out", lora_model())
    first = push_output_dir(folder, "user/again")  # the token comes from HF_TOKEN
    (folder / "README.md").write_text(CARD + "\nSecond run.\n")
    second = push_output_dir(folder, "user/again", commit_message="second run")

    repo = fake_hub.repo("user/again")
    assert first.oid != second.oid == repo.sha and not repo.private
    assert (repo.folder / "README.md").read_text().endswith("Second run.\n")
    assert [r.status for r in fake_hub.requests_to("POST", "/api/repos/create")] == [200, 409]
    assert fake_hub.requests_to("POST", "/commit/main")[-1].headers["authorization"] == f"Bearer {FAKE_TOKEN}"


def test_push_refuses_token_in_files(fake_hub: FakeHub, tmp_path: Path) -> None:
    folder = write_output_dir(tmp_path / "out", lora_model())
    (folder / "README.md").write_text(CARD + f"\nhub_token: {FAKE_TOKEN}\n")
    with pytest.raises(ValueError, match="README.md") as info:
        push_output_dir(folder, "user/leaky")
    assert FAKE_TOKEN not in str(info.value)
    assert not fake_hub.requests and not fake_hub.repos


def test_push_refuses_folder_without_model(fake_hub: FakeHub, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    (folder / "checkpoint-5").mkdir(parents=True)
    (folder / "checkpoint-5" / "adapter_config.json").write_text("{}")
    (folder / "README.md").write_text(CARD)
    with pytest.raises(ValueError, match="neither adapter_config.json nor config.json"):
        push_output_dir(folder, "user/empty")
    assert not fake_hub.requests


def test_model_push_to_hub_roundtrip(fake_hub: FakeHub) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_llama(layers=2)
    model.push_to_hub("user/m2")
    loaded = AutoModelForCausalLM.from_pretrained("user/m2")
    original = model.state_dict()
    assert loaded.state_dict().keys() == original.keys()
    assert all(torch.equal(tensor, original[name]) for name, tensor in loaded.state_dict().items())


def test_dataset_push_and_load(fake_hub: FakeHub) -> None:
    from datasets import Dataset, DatasetDict, load_dataset

    def rows(n: int, offset: int) -> list[dict]:
        return [
            {
                "messages": [
                    {"role": "user", "content": f"how deep to plough field {i}?"},
                    {"role": "assistant", "content": f"about {10 + i} cm, check the soil first"},
                ]
            }
            for i in range(offset, offset + n)
        ]

    data = DatasetDict({"train": Dataset.from_list(rows(6, 0)), "test": Dataset.from_list(rows(2, 100))})
    data.push_to_hub("user/agri-data")
    files = fake_hub.repo("user/agri-data", "dataset").files()
    assert any(f.startswith("data/train-") and f.endswith(".parquet") for f in files)

    loaded = load_dataset("user/agri-data")
    assert set(loaded) == {"train", "test"}
    for split in data:
        assert loaded[split].to_list() == data[split].to_list()
