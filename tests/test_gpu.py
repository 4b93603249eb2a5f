"""CUDA paths: the caching allocator reports through the same hook (skipped without a GPU)."""
import pytest
import torch

import memprof

pytestmark = pytest.mark.gpu


def test_cuda_allocations_match_the_caching_allocator():
    torch.cuda.synchronize()
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 10)).cuda()
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(64, 256, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    with memprof.track(model, opt) as prof:
        for _ in range(2):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
    torch.cuda.synchronize()
    assert prof.device == "cuda"
    mem = prof.memory
    real = mem["thread"] >= 0
    # our running total and the allocator's differ by the blocks alive before tracking
    diff = prof.live_bytes()[real] - mem["total_allocated"][real]
    assert (diff == diff[0]).all()
    # the peak without the blocks alive before tracking (the parameters, thread -1) is the
    # allocator's peak without them, less its rounding of each block to 512 bytes (an H200:
    # equal to the byte)
    before = int(mem["size"][mem["thread"] == -1].sum())
    slack = (torch.cuda.max_memory_allocated() - start) - (prof.peak - before)
    assert 0 <= slack <= 512 * int(real.sum())
    assert (prof.live_bytes(reserved=True) >= mem["total_allocated"]).all()
    assert prof.breakdown("category", at="end")["optimizer_state"] > 0


def test_cuda_oom_is_recorded_and_profile_saved(tmp_path):
    total = torch.cuda.get_device_properties(0).total_memory
    path = tmp_path / "oom.memprof"
    with pytest.raises(torch.OutOfMemoryError):
        with memprof.track(path=str(path)) as prof:
            keep = torch.empty(1024, device="cuda")
            torch.empty(total * 2, dtype=torch.uint8, device="cuda")
    assert prof.oom_events and prof.oom_events[0]["requested"] >= total
    saved = memprof.load(str(path))
    assert "OutOfMemoryError" in saved.meta["error"]
    del keep


def test_cuda_gradient_note_sees_new_gradients_in_the_cached_block():
    """The caching allocator hands a freed gradient's block to the next gradient of its size:
    the gradient note (which holds no reference to the old storage) must take each step's
    gradients anew, told by the allocation report of the reused block."""
    model = torch.nn.Linear(256, 256).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 256, device="cuda")
    addresses = []
    with memprof.track(model, opt) as prof:
        for _ in range(4):
            model(x).sum().backward()
            addresses.append(model.weight.grad.data_ptr())
            opt.step()
            opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    assert len(set(addresses)) < len(addresses)   # the block did come back
    from memprof.record.events import CAT_GRADIENTS
    grads = [s for s in prof.run.snapshots if s.category == CAT_GRADIENTS]
    assert len(grads) >= 4   # one per step, none skipped as "the same storages"
    assert prof.breakdown(at="end").get("gradients", 0) == 0   # set to None after the last step
