"""`python -m workers.llm.llama_check`: can this machine's llama-cpp-python build generate?

Loads the bundled SmolLM2 model and generates a few tokens from a prompt of
many tokens: a build that uses instructions this CPU lacks dies here by a
signal (SIGILL), as it would in a worker, and `ops/dev` then falls back to a
plain AVX2 build. Prints one line: tokens, timings and the CPU features the
loaded ggml backend uses.
"""

from __future__ import annotations

import sys
import time
from typing import Any, cast


def main() -> int:
    import llama_cpp

    from shared.models import resolve
    from workers.llm.ggml_cpu import load_cpu_backend

    variant = load_cpu_backend()

    llm = llama_cpp.Llama(model_path=resolve("bundled:smollm2-135m-instruct"), n_ctx=512, n_batch=32, seed=0, verbose=False)
    prompt: list[Any] = [{"role": "system", "content": "You are a helpful voice assistant. Answer in one short sentence."},
              {"role": "user", "content": "What is the capital of France, and which river runs through it?"}]
    t0 = time.perf_counter()
    out = llm.create_chat_completion(prompt, max_tokens=16, temperature=0.0, seed=0)
    elapsed = (time.perf_counter() - t0) * 1000
    usage = cast(dict[str, Any], out)["usage"]
    if usage["completion_tokens"] < 2:
        print(f"generated only {usage['completion_tokens']} token(s)", file=sys.stderr)
        return 1
    features = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    print(f"ok: {usage['prompt_tokens']} prompt + {usage['completion_tokens']} generated tokens in {elapsed:.0f} ms; "
          f"kernels {variant or 'built in'}; {features}")
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
