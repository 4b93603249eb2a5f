"""Planning: what a training step needs on a GPU you may not have, estimated on fake tensors.

    estimate      one training step on fake tensors -> Estimate (a Profile of the modelled GPU)
    fake_step     the recording mode of that step (storages, frees, FLOPs)
    cuda_autocast CUDA autocast's op policy, emulated on top of CPU autocast
    streams       the step's allocation stream as first step / steady state / accumulation
    batch_model   any micro-batch from estimates at two batch sizes
    allocator     the CUDA caching-allocator model (reserved bytes, fragmentation)
    gpus          the GPU table: memory, FLOP/s, bandwidth; what is usable
    checkpoint    activation-checkpointing policies (memprof.checkpoint.apply)
    workloads     models, batch functions and losses from what a user names
    timing        the time model (samples/s, estimated)
    advice        learning-rate and warmup advice for an effective batch
    codegen       the Python that applies an option of a plan
    search        recommend(): the search over micro-batch x accumulation x policy x precision

Planning may import record, profile and analyse; never report or cli (the report of a Plan is
memprof.report.plan). Import the modules themselves: this package imports none of them.
"""
