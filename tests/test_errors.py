"""What only a real server process shows about bad requests: bytes that are not HTTP, and
requests cut off mid-body, leave the gateway serving.

Every OpenAI-shaped error (status, message, type, param, code), API keys and the body limit
are tested in process, in tests/test_app_errors.py.
"""

from __future__ import annotations

import socket

import openai
from conftest import Gateway


def test_the_gateway_survives_abuse(gateway: Gateway, client: openai.OpenAI) -> None:
    """Garbage, truncated and abandoned requests leave the gateway serving."""
    host, port = gateway.root.removeprefix("http://").split(":")
    for payload in (b"GARBAGE\r\n\r\n", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    b"content-length: 100\r\n\r\n{\"model\":"):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(payload)
    assert gateway.process.poll() is None
    reply = client.chat.completions.create(model="echo", messages=[{"role": "user",
                                                                    "content": "still up?"}])
    assert reply.choices[0].message.content == "echo: still up?"


def test_an_error_reaches_the_real_client_over_real_http(client: openai.OpenAI) -> None:
    """The OpenAI error shape, as the SDK parses it off the wire."""
    try:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user",
                                                                 "content": "x"}])
    except openai.NotFoundError as caught:
        assert caught.body["code"] == "model_not_found" and caught.body["param"] == "model"
        assert caught.body["type"] == "invalid_request_error" and caught.body["message"]
    else:
        raise AssertionError("an unknown model was answered")
