"""`priority` on completions and chat (vLLM's): honoured by a server started with --scheduling-policy priority,
refused by name by a first-come-first-served one."""

from __future__ import annotations

from softprompt.engine.server.registry import PromptRegistry

from .support import RunningServer, make_engine


def test_priority_reaches_the_scheduler(model_dir_for):
    servers = [RunningServer(make_engine(model_dir_for("llama"), scheduling_policy=policy), PromptRegistry())
               for policy in ("priority", "fcfs")]
    try:
        seen = []
        engine = servers[0].engine
        original = engine.scheduler.add
        engine.scheduler.add = lambda seq: (seen.append(seq.request.priority), original(seq))[1]
        http = servers[0].client()
        r = http.post("/v1/completions", json={"model": "base", "prompt": [5, 6], "max_tokens": 2, "priority": -3})
        assert r.status_code == 200, r.text
        chat = http.post("/v1/chat/completions", json={"model": "base", "max_tokens": 2, "priority": 4,
                                                       "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200 and seen == [-3, 4]
        refused = servers[1].client().post("/v1/completions", json={"model": "base", "prompt": [5], "priority": 1})
        assert refused.status_code == 400 and "scheduling-policy priority" in refused.json()["error"]["message"]
        servers[1].assert_pool_empty()
    finally:
        for s in servers:
            s.stop()
