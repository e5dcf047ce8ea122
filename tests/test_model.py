"""The model computes the published formulas, and the loader refuses what it cannot load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from model_executor.config import CheckpointError
from model_executor.llada import LLaDAModel
from model_executor.checkpoint import check_folder

from .reference_llada import ReferenceLLaDA


@pytest.fixture(scope="module")
def reference(model_dir):
    return ReferenceLLaDA(model_dir)


def test_logits_match_reference_formulas(model_dir, reference, dev_prompts):
    model = LLaDAModel.from_pretrained(model_dir, dtype=torch.float32)
    mask = reference.mask_id
    for prompt in dev_prompts[:4]:
        ids = torch.tensor(prompt + [mask] * 48)
        # Commit a few random generation tokens so that not every position is a mask.
        g = torch.Generator().manual_seed(len(prompt))
        pos = len(prompt) + torch.randperm(48, generator=g)[:16]
        ids[pos] = torch.randint(0, 1300, (16,), generator=g)
        diff = (model.forward(ids) - reference.logits(ids)).abs().max().item()
        assert diff <= 1e-4, diff


def test_bfloat16_close_to_float32(model_dir, dev_prompts):
    f32 = LLaDAModel.from_pretrained(model_dir, dtype=torch.float32)
    bf16 = LLaDAModel.from_pretrained(model_dir, dtype=torch.bfloat16)
    ids = torch.tensor(dev_prompts[0] + [f32.cfg.mask_token_id] * 32)
    a, b = f32.forward(ids), bf16.forward(ids).float()
    rel = ((a - b).norm() / a.norm()).item()
    assert bf16.wte.dtype == torch.bfloat16 and rel < 5e-2, rel


def _copy(model_dir: str, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(model_dir, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("breakage, message", [
    (lambda d: (d / "config.json").unlink(), "no config.json"),
    (lambda d: (d / "tokenizer.json").unlink(), "tokenizer file(s) missing: tokenizer.json"),
    (lambda d: (d / "model-00002-of-00004.safetensors").unlink(),
     "weight shard(s) missing: model-00002-of-00004.safetensors"),
    (lambda d: _edit_config(d, model_type="llama"), "model_type is 'llama'"),
    (lambda d: _edit_config(d, alibi=True), "alibi=True is not supported"),
    (lambda d: _edit_config(d, n_kv_heads=2), "grouped-query attention is not supported"),
    (lambda d: _edit_config(d, block_type="sequential"), "block_type='sequential'"),
    (lambda d: _edit_config(d, n_layers=13), "tensors missing from the checkpoint"),
    (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
])
def test_bad_checkpoint_folders_are_refused(model_dir, tmp_path, breakage, message):
    folder = _copy(model_dir, tmp_path)
    breakage(folder)
    with pytest.raises(CheckpointError) as e:
        check_folder(str(folder))
    assert message in str(e.value)


def test_shape_mismatch_is_refused(model_dir, tmp_path):
    folder = _copy(model_dir, tmp_path)
    _edit_config(folder, mlp_hidden_size=512)
    with pytest.raises(CheckpointError, match="does not match config"):
        LLaDAModel.from_pretrained(str(folder))
