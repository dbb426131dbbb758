"""One offline vLLM throughput run, executed with .venv-vllm/bin/python by bench.inference_vllm (no
welore here). argv[1]: JSON {"model", "dtype", "prompts", "prompt_tokens", "new_tokens", "eager"}.
Engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by the caller) so VmHWM is the
engine's. Prints `RESULT {"tok_s", "load_s", "gen_s", "peak_rss_mb"}`."""

import json
import random
import sys
import time


def peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    from vllm import LLM, SamplingParams

    args = json.loads(sys.argv[1])
    t0 = time.perf_counter()
    llm = LLM(model=args["model"], dtype=args["dtype"], skip_tokenizer_init=True, enforce_eager=args["eager"],
              max_model_len=args["prompt_tokens"] + args["new_tokens"] + 16, kv_cache_memory_bytes=1 << 30, seed=0)
    load_s = time.perf_counter() - t0
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(100, 40000) for _ in range(args["prompt_tokens"])]}
               for _ in range(args["prompts"])]
    params = SamplingParams(temperature=0.0, max_tokens=args["new_tokens"], ignore_eos=True, detokenize=False)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, detokenize=False), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    gen_s = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    print("RESULT " + json.dumps({"tok_s": tokens / gen_s, "load_s": load_s, "gen_s": gen_s,
                                  "peak_rss_mb": peak_rss_mb()}), flush=True)


if __name__ == "__main__":
    main()
