"""`vllm-elastic generate` end to end on the mini model."""

from __future__ import annotations

import json

from vllm_elastic.cli import main


def test_generate_jsonl(model_dir, dev_items, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    items = dev_items[:2]
    lines = [{"id": items[0]["id"], "messages": items[0]["messages"]},
             {"prompt": items[1]["prompt"]}]
    inp.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--model", model_dir, "--policy", "elastic", "--gen-length", "32",
               "--block-length", "32", "--threshold", "0.9", "--batch-size", "2",
               "--input", str(inp), "--output", str(out)])
    assert rc == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [items[0]["id"], "1"]
    for r in rows:
        assert r["token_ids"] and isinstance(r["text"], str)
        assert {"steps", "layer_refresh_fraction", "compute_fraction"} <= set(r["stats"])
    assert "tokens/s" in capsys.readouterr().err


def test_bad_arguments_exit_with_message(model_dir, capsys):
    rc = main(["generate", "--model", model_dir, "--gen-length", "50", "--prompt", "hi"])
    assert rc == 2 and "not a multiple of block_length" in capsys.readouterr().err
    rc = main(["generate", "--model", "/nonexistent", "--prompt", "hi"])
    assert rc == 2 and "not a directory" in capsys.readouterr().err
