"""A small OpenAI client that runs unchanged against `tide serve` and an SGLang server.

    tide serve --demo                                          # serves at http://127.0.0.1:8080/v1
    python examples/openai_client.py "What is 123 + 456?"
    python examples/openai_client.py --base-url http://127.0.0.1:30000/v1 "Why is the sky blue?"   # SGLang

It uses only what both servers speak: GET /v1/models (to find the model when --model is not
given) and POST /v1/chat/completions with max_tokens and temperature, streamed (with the usage
chunk) or not. Needs `pip install openai`.
"""

from __future__ import annotations

import argparse
import sys

from openai import OpenAI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Ask an OpenAI-compatible server one question.")
    p.add_argument("prompt", nargs="?", default="What is 123 + 456?")
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1", help="the server's /v1 URL")
    p.add_argument("--model", help="the model id (default: the first one the server lists)")
    p.add_argument("--api-key", default="none", help="the server's key (a server without one ignores it)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    args = p.parse_args(argv)

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    request = {"model": model, "messages": [{"role": "user", "content": args.prompt}],
               "max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.no_stream:
        reply = client.chat.completions.create(**request)
        print(reply.choices[0].message.content)
        usage = reply.usage
    else:
        usage = None
        for chunk in client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
            usage = chunk.usage or usage
        print()
    if usage is not None:
        print(f"[{model}: {usage.prompt_tokens} prompt tokens, {usage.completion_tokens} completion tokens]",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
