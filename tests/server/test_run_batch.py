"""`softprompt run-batch`: a JSONL file of OpenAI batch requests through the server's app in one process; results
in input order equal to what Engine.generate gives, bad lines and bad requests answered without stopping the rest."""

from __future__ import annotations

import json

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.cli import main


def test_run_batch(model_dir_for, adapter_for, tmp_path, capsys):
    model, adapter = model_dir_for("llama"), adapter_for("llama", seed=2)
    lines = [
        {"custom_id": "n3", "method": "POST", "url": "/v1/completions",  # 3 of the 4 slots: others wait for room
         "body": {"model": "sent", "prompt": [5, 6, 7], "max_tokens": 5, "temperature": 0, "n": 3,
                  "return_token_ids": True}},
        {"custom_id": "c0", "method": "POST", "url": "/v1/completions",
         "body": {"model": "sent", "prompt": [5, 6, 7], "max_tokens": 5, "temperature": 0, "return_token_ids": True}},
        {"custom_id": "c1", "url": "/v1/chat/completions",  # method: POST by default
         "body": {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                  "temperature": 0, "return_token_ids": True}},
        {"custom_id": "bad-body", "method": "POST", "url": "/v1/completions",
         "body": {"model": "sent", "prompt": [5], "max_tokens": 2, "temperature": -1}},
        {"custom_id": "unknown", "method": "POST", "url": "/v1/completions", "body": {"model": "nope", "prompt": "x"}},
        {"custom_id": "url", "method": "POST", "url": "/v1/embeddings", "body": {}},
        {"custom_id": "stream", "method": "POST", "url": "/v1/completions",
         "body": {"model": "base", "prompt": "x", "stream": True}},
        "not json",
        {"custom_id": "n9", "method": "POST", "url": "/v1/completions",  # more than the server ever admits
         "body": {"model": "base", "prompt": [5], "max_tokens": 2, "n": 9}},
        *({"custom_id": f"many-{i}", "method": "POST", "url": "/v1/completions",
           "body": {"model": "sent" if i % 2 else "base", "prompt": [9, i + 1], "max_tokens": 3, "temperature": 0,
                    "return_token_ids": True}} for i in range(12)),
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n\n")
    out = tmp_path / "out.jsonl"
    argv = ["run-batch", str(model), "--prompts", f"sent={adapter}", "--device", "cpu", "--kv-cache-bytes",
            str(4 << 20), "--max-num-seqs", "4", "--max-queue", "0", "-i", str(source), "-o", str(out)]
    assert main(argv) == 0
    assert "21 requests, 6 failed" in capsys.readouterr().err
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["custom_id"] for r in results] == [line["custom_id"] if isinstance(line, dict) else None
                                                for line in lines]
    assert len({r["id"] for r in results}) == len(results)
    by_id = {r["custom_id"]: r for r in results}

    engine = Engine(model, device="cpu", kv_cache_bytes=4 << 20)
    engine.add_prompt("sent", adapter)
    greedy = SamplingParams(max_new_tokens=5)
    [sent] = engine.generate([Request(prompt="sent", input_ids=[5, 6, 7], sampling=greedy)])
    c0 = by_id["c0"]["response"]
    assert c0["status_code"] == 200 and c0["body"]["choices"][0]["token_ids"] == sent.token_ids
    chat = by_id["c1"]["response"]["body"]["choices"][0]
    [want] = engine.generate([Request(messages=[{"role": "user", "content": "hi"}],
                                      sampling=SamplingParams(max_new_tokens=4))])
    assert chat["token_ids"] == want.token_ids and chat["message"]["content"] == want.text
    for i in range(12):  # more requests than --max-num-seqs: they queue, none is lost
        [want] = engine.generate([Request(prompt="sent" if i % 2 else None, input_ids=[9, i + 1],
                                          sampling=SamplingParams(max_new_tokens=3))])
        assert by_id[f"many-{i}"]["response"]["body"]["choices"][0]["token_ids"] == want.token_ids
    assert [c["token_ids"] for c in by_id["n3"]["response"]["body"]["choices"]] == [sent.token_ids] * 3
    assert by_id["n9"]["response"]["status_code"] == 400  # refused outright: it could never be admitted
    assert by_id["bad-body"]["response"]["status_code"] == 400
    assert "temperature" in by_id["bad-body"]["response"]["body"]["error"]["message"]
    assert by_id["unknown"]["response"]["status_code"] == 404
    for custom_id, words in (("url", "url must be one of"), ("stream", "cannot stream"), (None, "not JSON")):
        r = by_id[custom_id]
        assert r["response"] is None and words in r["error"]["message"], r


def test_run_batch_refuses_what_it_cannot_run(model_dir_for, tmp_path, capsys):
    model = str(model_dir_for("llama"))
    assert main(["run-batch", model, "-i", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["run-batch", model, "--ray", "-i", "x", "-o", "y"]) == 2
    assert "leave out --ray" in capsys.readouterr().err
