"""Run as a script: plan the 7B Llama + LoRA (meta-built) and print JSON facts about it."""
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import memprof  # noqa: E402

t0 = time.perf_counter()
plan = memprof.recommend(model="llm_factories:llama_7b_lora", batch="llm_factories:tokens",
                         gpu="A100 80GB", effective_batch=8, precisions=["bf16"],
                         policies=["every"], confirm=False)
wall = time.perf_counter() - t0
c = plan.combinations[0]
prof = c.model.lo.profile
mem = prof.memory
grads = int(mem["size"][(prof.category == 1) & (mem["size"] > 0)].sum())
end = prof.breakdown("category", at="end")
print(json.dumps({"wall_s": wall, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "params_end": end["parameters"], "state_end": end["optimizer_state"],
                  "grads_allocated": grads, "built_on": plan.model.get("built_on"),
                  "kernels": plan.assumptions["kernels"], "gpu": plan.gpu.name,
                  "best": plan.best.as_dict() if plan.best else None,
                  "max_micro_batch": c.max_micro_batch}))
