"""Each member alone, greedy, on plain vLLM (no fusion server): the reference outputs.

Run as a script (vLLM engines must start under ``__main__``):
``python vllm_greedy_ref.py IN.json OUT.json`` where IN.json is
``{"models": {name: dir}, "prompts": [...], "max_tokens": N, "max_model_len": L}``;
OUT.json gets ``{name: [{"ids": [...], "finish": "stop" | "length"}, ...]}``, one entry
per prompt: the member's own prompt encoding (its tokenizer, special tokens added),
its greedy continuation ids and vLLM's finish reason.
"""

from __future__ import annotations

import gc
import json
import pathlib
import sys


def main(spec_path: str, out_path: str) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(pathlib.Path(spec_path).read_text())
    out = {}
    for name, model in spec["models"].items():
        tokenizer = AutoTokenizer.from_pretrained(model)
        llm = LLM(
            model=model,
            dtype="float32",
            enforce_eager=True,
            max_model_len=spec["max_model_len"],
            kv_cache_memory_bytes=64 * 1024**2,
            skip_tokenizer_init=True,
        )
        params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], detokenize=False)
        prompts = [
            TokensPrompt(prompt_token_ids=tokenizer(p, add_special_tokens=True)["input_ids"])
            for p in spec["prompts"]
        ]
        results = llm.generate(prompts, params, use_tqdm=False)
        out[name] = [
            {"ids": list(r.outputs[0].token_ids), "finish": r.outputs[0].finish_reason}
            for r in results
        ]
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
