"""Serve SmolLM2 with DSpark and stream a chat completion with the OpenAI client.

    .venv/bin/vllm-dspark serve ~/.cache/vllm-dspark/smollm2-135m-instruct \
        --drafter drafters/smollm2-135m-dspark -k 7 --dtype float32 --host 127.0.0.1 --port 8000 &
    .venv/bin/python examples/serve_openai_client.py
    curl -s 127.0.0.1:8000/metrics | grep vllm_dspark:
"""
import openai

client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
model = client.models.list().data[0].id
stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Explain speculative decoding in two sentences."}],
    max_tokens=96, temperature=0, stream=True)
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
