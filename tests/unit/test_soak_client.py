"""The soak's client side without servers: retries after connection errors, errors that name the server."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import openai
import pytest

from vllm_dspark.eval import soak_servers


def _client(failures: list[BaseException]):
    """A stand-in AsyncOpenAI whose completions.create raises the given errors in turn, then answers."""
    calls = []

    async def create(**kwargs):
        calls.append(kwargs)
        if failures:
            raise failures.pop(0)
        choice = SimpleNamespace(index=0, text="ok", model_extra={"token_ids": [7, 8]})
        return SimpleNamespace(choices=[choice])

    return SimpleNamespace(completions=SimpleNamespace(create=create)), calls


def _job() -> soak_servers.Job:
    return soak_servers.Job(3, "greedy", prompt=[1, 2, 3], max_tokens=2)


def _connection_error() -> openai.APIConnectionError:
    request = httpx.Request("POST", "http://127.0.0.1:1/v1/completions")
    try:
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
    except httpx.RemoteProtocolError as cause:
        error = openai.APIConnectionError(request=request)
        error.__cause__ = cause
        return error


def test_a_dropped_connection_is_retried_once_and_counted():
    client, calls = _client([_connection_error()])
    retries: dict[str, int] = {}
    texts, ids = asyncio.run(soak_servers._send(client, "dspark", _job(), retries))
    assert (texts, ids, len(calls), retries) == (["ok"], [[7, 8]], 2, {"dspark": 1})


def test_errors_name_the_server_and_the_cause():
    client, calls = _client([_connection_error(), _connection_error()])
    retries: dict[str, int] = {}
    with pytest.raises(soak_servers._ServerFailed) as info:
        asyncio.run(soak_servers._send(client, "reference", _job(), retries))
    assert info.value.server == "reference" and len(calls) == 2 and retries == {"reference": 1}
    assert str(info.value) == ("reference server: APIConnectionError: Connection error. (RemoteProtocolError: "
                               "Server disconnected without sending a response.)")
    request = httpx.Request("POST", "http://127.0.0.1:1/v1/completions")
    bad = openai.BadRequestError("max_tokens too large", response=httpx.Response(400, request=request), body=None)
    client, calls = _client([bad])
    with pytest.raises(soak_servers._ServerFailed, match=r"^dspark server: HTTP 400: max_tokens too large$"):
        asyncio.run(soak_servers._send(client, "dspark", _job(), retries))
    assert len(calls) == 1  # HTTP errors are answers: never re-sent
