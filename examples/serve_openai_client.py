"""Serve SmolLM2 with DSpark and stream a chat completion with the OpenAI client.

    .venv/bin/vllm-dspark serve ~/.cache/vllm-dspark/smollm2-135m-instruct \
        --drafter drafters/smollm2-135m-dspark -k 7 --dtype float32 --host 127.0.0.1 --port 8000 &
    .venv/bin/python examples/serve_openai_client.py [--port 8000 | --base-url http://HOST:PORT/v1]
    curl -s 127.0.0.1:8000/metrics | grep vllm_dspark:
"""
import argparse

import openai


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--port", type=int, default=8000, help="the server's port on 127.0.0.1")
    ap.add_argument("--base-url", help="the server's OpenAI base URL (overrides --port), e.g. http://host:8000/v1")
    ap.add_argument("--prompt", default="Explain speculative decoding in two sentences.", help="the user message")
    ap.add_argument("--max-tokens", type=int, default=96, help="tokens to generate")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url or f"http://127.0.0.1:{args.port}/v1", api_key="unused")
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": args.prompt}],
        max_tokens=args.max_tokens, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()


if __name__ == "__main__":
    main()
