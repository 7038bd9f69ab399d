"""The chat node's OpenAI-compatible endpoint through the whole harness (the stack
`make run` starts, on free ports), driven by the official `openai` Python client, plain
and streamed: a client library, not only curl, holds a conversation through Envoy and
the filter.
"""

from __future__ import annotations

import hashlib

from openai import OpenAI, omit



def digest(messages) -> str:
    h = hashlib.sha256()
    for m in messages:
        h.update(m.encode("utf-8") + b"\n")
    return h.hexdigest()


def test_the_official_openai_client_holds_a_conversation_through_envoy(full_stack):
    stack = full_stack()
    base = f"http://127.0.0.1:{stack.ports.listen}/v1"
    # The reference filter config reads the session token from `authorization: Bearer`,
    # where the client puts its api_key: the session token IS the api key. The first
    # request goes without one (no Authorization header), so the filter mints a session
    # and returns its token in `x-session-token`.
    first = OpenAI(base_url=base, api_key="none yet", max_retries=0)
    raw = first.chat.completions.with_raw_response.create(
        model="chat-node", messages=[{"role": "user", "content": "hello, client"}],
        extra_headers={"Authorization": omit})
    token = raw.headers["x-session-token"]
    c1 = raw.parse()
    assert c1.choices[0].message.content == "turn 1: you said 'hello, client'; this is the start of our conversation"
    assert c1.model_extra["session_affinity"]["turn"] == 1

    client = OpenAI(base_url=base, api_key=token, max_retries=0)
    c2 = client.chat.completions.create(
        model="chat-node", messages=[{"role": "user", "content": "second, plain"}])
    assert c2.object == "chat.completion"
    assert c2.choices[0].message.content.startswith("turn 2: you said 'second, plain'; earlier you mentioned 'hello")
    assert c2.usage.completion_tokens == len(c2.choices[0].message.content.split())

    chunks = list(client.chat.completions.create(
        model="chat-node", stream=True, messages=[{"role": "user", "content": "third, streamed"}]))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text.startswith("turn 3: you said 'third, streamed'; earlier you mentioned 'hello, client'"), text
    assert chunks[-1].choices[0].finish_reason == "stop"
    info = chunks[-1].model_extra["session_affinity"]
    assert (info["turn"], info["history_digest"]) == (3, digest(["hello, client", "second, plain", "third, streamed"]))
