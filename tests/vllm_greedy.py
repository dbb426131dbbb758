"""Greedy generation in vLLM, run with .venv-vllm/bin/python by tests/test_vllm.py (no welore, no
pytest here). argv[1]: JSON {"model", "prompts" (lists of token ids, or strings), "max_tokens",
"dtype", "tp"}. Prints one line `RESULT {"tokens": [[...]], "logprobs": [[...]]}` (the log-prob of
each chosen token)."""

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams

    args = json.loads(sys.argv[1])
    ids = not isinstance(args["prompts"][0], str)
    llm = LLM(model=args["model"], dtype=args.get("dtype", "auto"), tensor_parallel_size=args.get("tp", 1),
              skip_tokenizer_init=ids, enforce_eager=True, max_model_len=args.get("max_model_len", 256),
              kv_cache_memory_bytes=256 << 20, seed=0)
    prompts = [{"prompt_token_ids": p} for p in args["prompts"]] if ids else args["prompts"]
    params = SamplingParams(temperature=0.0, max_tokens=args["max_tokens"], ignore_eos=True, logprobs=1,
                            detokenize=not ids)
    outs = llm.generate(prompts, params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[step[t].logprob for t, step in zip(toks, o.outputs[0].logprobs)] for toks, o in zip(tokens, outs)]
    print("RESULT " + json.dumps({"tokens": tokens, "logprobs": logprobs}), flush=True)


if __name__ == "__main__":
    main()
