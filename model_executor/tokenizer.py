"""The checkpoint's own tokenizer and chat template, with the special ids decoding needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .checkpoint import check_folder
from .config import CheckpointError

END_OF_TURN = "<|eot_id|>"


@dataclass
class SpecialIds:
    mask: int
    eos: int
    eot: int | None
    bos: int | None

    @property
    def stop(self) -> tuple[int, ...]:
        return (self.eos,) if self.eot is None else (self.eos, self.eot)


def load_tokenizer(folder: str) -> Any:
    """A `PreTrainedTokenizerFast` from the folder's own files (no remote code)."""
    from transformers import PreTrainedTokenizerFast

    check_folder(folder)
    try:
        return PreTrainedTokenizerFast.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - report which folder and why
        raise CheckpointError(f"{folder}: tokenizer could not be loaded ({e})") from e


def special_ids(folder: str, tokenizer: Any | None = None) -> SpecialIds:
    cfg = check_folder(folder, need_tokenizer=tokenizer is None)
    tok = tokenizer if tokenizer is not None else load_tokenizer(folder)
    eot = tok.convert_tokens_to_ids(END_OF_TURN)
    if eot is None or eot == tok.unk_token_id:
        eot = None
    return SpecialIds(mask=cfg.mask_token_id, eos=cfg.eos_token_id, eot=eot,
                      bos=cfg.bos_token_id)


def config_special_ids(folder: str) -> SpecialIds:
    """The special ids config.json alone gives (no tokenizer: no end-of-turn id)."""
    from .config import LLaDAConfig

    cfg = LLaDAConfig.from_folder(folder)
    return SpecialIds(mask=cfg.mask_token_id, eos=cfg.eos_token_id, eot=None,
                      bos=cfg.bos_token_id)


def folder_special_ids(folder: str, need_tokenizer: bool = True) -> SpecialIds:
    """The tokenizer's special ids; without `need_tokenizer`, a folder with no tokenizer
    files gives config.json's (random-weight folders served without a tokenizer)."""
    import os

    from .checkpoint import TOKENIZER_FILES

    if not need_tokenizer and not all(os.path.isfile(os.path.join(folder, f))
                                      for f in TOKENIZER_FILES):
        return config_special_ids(folder)
    return special_ids(folder)


def render_prompt(tokenizer: Any, item: dict[str, Any]) -> list[int]:
    """Token ids of one input: raw `prompt` text, or chat `messages` via the chat template."""
    if "messages" in item and item["messages"] is not None:
        messages = item["messages"]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError("'messages' must be a list of {role, content} objects")
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    if "prompt" in item and isinstance(item["prompt"], str):
        return tokenizer.encode(item["prompt"], add_special_tokens=False)
    raise ValueError("each input needs 'prompt' (text) or 'messages' (chat)")
