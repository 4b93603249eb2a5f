"""GPU table: memory capacity, peak FLOP/s per precision and memory bandwidth, plus detection.

``lookup(spec)`` accepts a table name (``v100-16gb``, ``a100-40gb``, ``h100-80gb``, ``rtx-4090``,
...), an alias as the driver names the card (``"Tesla V100-SXM2-16GB"``, ``"NVIDIA H100 80GB
HBM3"``, case-insensitive), ``"auto"`` (the GPU of this machine, via torch.cuda or NVML), or a
plain capacity such as ``"24gb"`` / ``"16GiB"`` (a generic GPU whose FLOP/s are unknown;
GB = 10**9 bytes, GiB = 2**30 bytes).

Where the numbers come from (each entry cites its source in a comment):

* ``memory_bytes`` is what ``torch.cuda.get_device_properties(i).total_memory`` (=
  ``cudaDeviceProp.totalGlobalMem``) reports, taken from recorded torch/deviceQuery output; it
  varies by a few hundred MiB between driver versions, so the smallest value seen is used.
  Where no such record was available the entry says how the value was estimated.
  ``lookup("auto")`` replaces it by the value of the GPU at hand.
* Peak FLOP/s are the vendor datasheet / architecture whitepaper numbers for *dense* math
  (datasheets that list "with sparsity" figures are halved, as they state). fp16 and bf16 are
  tensor-core rates with fp32 accumulation (what PyTorch's matmuls use; GeForce cards have a
  2x faster fp16-accumulate rate that PyTorch does not use by default). ``None`` means the
  precision has no such hardware path (V100 and T4 have neither TF32 nor BF16 tensor cores).
* Bandwidth is the datasheet figure in bytes/s (vendor GB = 10**9 bytes).

What fits is ``usable_bytes(gpu)``: total memory minus the CUDA context overhead that lives
outside PyTorch's allocator, minus a fit margin; see ``DEFAULT_OVERHEAD_BYTES`` and
``FIT_MARGIN``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional, Tuple, Union

MiB = 1 << 20
GiB = 1 << 30
TFLOPS = 1e12

#: CUDA context + kernel modules of a PyTorch process, bytes, outside the caching allocator.
#: Measured in pytorch/pytorch PR 86509 (``total - free`` after one small CUDA tensor):
#: 287,047,680 bytes with lazy module loading (CUDA >= 11.7, PyTorch's default since 1.13) and
#: 666,632,192 bytes with every module loaded eagerly. The default is the eager figure: with
#: lazy loading the context starts near 287 MB and grows as kernels (cuBLAS, cuDNN, ...) are
#: first used, and a training loop touches an unknown share of them, so the eager-loading size
#: is the bound that holds whatever runs (a maintainer quotes ~400 MB for lazy loading in
#: practice, pytorch/pytorch issue 109888). CUDA 11.2-era stacks without lazy loading reported
#: ~1.3 GB: pass ``overhead=`` for those.
DEFAULT_OVERHEAD_BYTES = 666_632_192
#: Lazy-loading context size of the same measurement, for callers that want the optimistic end.
LAZY_CONTEXT_BYTES = 287_047_680
#: Share of total memory kept free when deciding what fits: covers what a CPU-recorded replay
#: does not see (cuDNN convolution workspaces that the caching allocator serves on a GPU, NCCL
#: buffers, allocator behaviour that is not modelled such as multiple streams). A stated
#: choice, not a measurement; override with ``usable_bytes(..., margin=)``.
FIT_MARGIN = 0.05

PRECISIONS = ("fp32", "tf32", "fp16", "bf16")
_PRECISION_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "32": "fp32",
    "tf32": "tf32",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "16": "fp16", "fp16-mixed": "fp16",
    "16-mixed": "fp16",
    "bf16": "bf16", "bfloat16": "bf16", "bf16-mixed": "bf16",
}


@dataclasses.dataclass(frozen=True)
class GPU:
    name: str                                  #: table name, e.g. "v100-16gb"
    aliases: Tuple[str, ...]                   #: other accepted names (driver names included)
    memory_bytes: int                          #: total_memory as torch reports it
    fp32: Optional[float]                      #: peak dense FLOP/s, fp32 (non-tensor)
    tf32: Optional[float]                      #: tensor-core TF32; None: not supported
    fp16: Optional[float]                      #: tensor-core fp16, fp32 accumulate
    bf16: Optional[float]                      #: tensor-core bf16, fp32 accumulate; None: no
    bandwidth: Optional[float]                 #: memory bandwidth, bytes/s
    compute_capability: Optional[Tuple[int, int]] = None
    memory_source: str = ""                    #: where memory_bytes comes from
    generic: bool = False                      #: capacity-only entry: FLOP/s unknown
    vendor: str = "nvidia"                     #: "nvidia" | "amd" (ROCm: cc = gfx major/minor)
    note: str = ""                             #: how an ambiguous name was resolved
    link: Optional[float] = None               #: GPU-to-GPU in a node, bytes/s per direction
    link_kind: str = ""                        #: "nvlink3", "pcie4", ... (see _LINKS)
    network: Optional[float] = None            #: inter-node bandwidth per GPU, bytes/s

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GiB

    def peak_flops(self, precision: str) -> Optional[float]:
        """Peak dense FLOP/s for a precision (fp32, tf32, fp16, bf16); None if unknown or
        not supported."""
        return getattr(self, canonical_precision(precision))

    def supports(self, precision: str) -> bool:
        """Whether the GPU runs this precision in hardware (bf16 and tf32 need compute
        capability >= 8.0). A generic GPU without a known compute capability is assumed to
        support every precision."""
        p = canonical_precision(precision)
        if p in ("fp32", "fp16"):
            return True
        if not self.generic:
            return getattr(self, p) is not None
        if self.compute_capability is None:
            return True
        return self.compute_capability >= (8, 0)


def canonical_precision(precision: str) -> str:
    p = _PRECISION_ALIASES.get(str(precision).strip().lower())
    if p is None:
        raise ValueError(f"unknown precision {precision!r}; expected one of "
                         f"{', '.join(PRECISIONS)}")
    return p


def _mib(n: int) -> int:
    return n * MiB


# name, aliases, memory, fp32, tf32, fp16, bf16, bandwidth, cc, memory source
_TABLE = (
    # NVIDIA Tesla V100 GPU Accelerator datasheet, "V100 for NVLink" (SXM2): FP32 15.7 TFLOPS,
    # Tensor 125 TFLOPS, 900 GB/s. Volta has no TF32/BF16 tensor cores.
    GPU("v100-16gb", ("v100-sxm2-16gb", "tesla v100-sxm2-16gb"),
        _mib(16160), 15.7 * TFLOPS, None, 125 * TFLOPS, None, 900e9, (7, 0),
        "torch total_memory 16160 MiB (Tesla V100-SXM2-16GB)"),
    GPU("v100-32gb", ("v100-sxm2-32gb", "tesla v100-sxm2-32gb"),
        _mib(32510), 15.7 * TFLOPS, None, 125 * TFLOPS, None, 900e9, (7, 0),
        "estimate: torch total_memory 32510 MiB recorded on Tesla V100-PCIE-32GB, "
        "assumed equal for SXM2"),
    # Same datasheet, "V100 for PCIe": FP32 14 TFLOPS, Tensor 112 TFLOPS, 900 GB/s.
    GPU("v100-pcie-16gb", ("tesla v100-pcie-16gb",),
        _mib(16160), 14 * TFLOPS, None, 112 * TFLOPS, None, 900e9, (7, 0),
        "torch total_memory 16160 MiB (Tesla V100-PCIE-16GB)"),
    GPU("v100-pcie-32gb", ("tesla v100-pcie-32gb",),
        _mib(32510), 14 * TFLOPS, None, 112 * TFLOPS, None, 900e9, (7, 0),
        "torch total_memory 32510 MiB (Tesla V100-PCIE-32GB)"),
    # NVIDIA T4 Tensor Core GPU datasheet: FP32 8.1 TFLOPS, mixed-precision (FP16/FP32)
    # 65 TFLOPS, "320+ GB/s". Turing has no TF32/BF16 tensor cores.
    GPU("t4", ("tesla t4",),
        15_843_721_216, 8.1 * TFLOPS, None, 65 * TFLOPS, None, 320e9, (7, 5),
        "deviceQuery totalGlobalMem 15843721216 B (Tesla T4; torch reports ~15109 MiB)"),
    # A10G is AWS's variant of the A10 (g5 instances); NVIDIA publishes no A10G datasheet.
    # Numbers of the NVIDIA A10 Tensor Core GPU datasheet (FP32 31.2, TF32 62.5, BF16/FP16
    # 125 TFLOPS dense, 600 GB/s): treat the FLOP/s as an upper bound for the A10G.
    GPU("a10g", ("nvidia a10g", "a10"),
        _mib(22587), 31.2 * TFLOPS, 62.5 * TFLOPS, 125 * TFLOPS, 125 * TFLOPS, 600e9, (8, 6),
        "torch total_memory 22587 MiB (NVIDIA A10G)"),
    # NVIDIA L4 Tensor Core GPU datasheet: FP32 30.3 TFLOPS; TF32 120, FP16/BF16 242 TFLOPS
    # are stated with sparsity (dense = half); 300 GB/s.
    GPU("l4", ("nvidia l4",),
        23_583_784_960, 30.3 * TFLOPS, 120 * TFLOPS / 2, 242 * TFLOPS / 2, 242 * TFLOPS / 2,
        300e9, (8, 9), "deviceQuery totalGlobalMem 23583784960 B (NVIDIA L4, driver 12.2)"),
    # NVIDIA Ampere GA102 GPU Architecture whitepaper, appendix (GeForce RTX 3090): FP32 35.6;
    # TF32 tensor 35.6; FP16 and BF16 tensor with FP32 accumulate 71 TFLOPS; 936 GB/s.
    GPU("rtx-3090", ("3090", "rtx3090", "geforce rtx 3090", "geforce-rtx-3090"),
        _mib(24268), 35.6 * TFLOPS, 35.6 * TFLOPS, 71 * TFLOPS, 71 * TFLOPS, 936e9, (8, 6),
        "torch total_memory 24268 MiB (GeForce RTX 3090)"),
    # NVIDIA Ada GPU Architecture whitepaper, appendix (GeForce RTX 4090): FP32 82.6; TF32
    # tensor 82.6; FP16 and BF16 tensor with FP32 accumulate 165.2 TFLOPS; 1008 GB/s.
    GPU("rtx-4090", ("4090", "rtx4090", "geforce rtx 4090", "geforce-rtx-4090"),
        _mib(24563), 82.6 * TFLOPS, 82.6 * TFLOPS, 165.2 * TFLOPS, 165.2 * TFLOPS, 1008e9,
        (8, 9), "torch total_memory 24563 MiB (GeForce RTX 4090)"),
    # NVIDIA A100 Tensor Core GPU datasheet: FP32 19.5, TF32 156, BF16/FP16 312 TFLOPS (dense;
    # the same for PCIe and SXM); bandwidth 1,555 GB/s (40GB), 1,935 (80GB PCIe), 2,039 GB/s
    # (80GB SXM).
    GPU("a100-40gb", ("a100-sxm4-40gb", "a100-pcie-40gb"),
        _mib(40326), 19.5 * TFLOPS, 156 * TFLOPS, 312 * TFLOPS, 312 * TFLOPS, 1555e9, (8, 0),
        "torch total_memory 40326 MiB (A100-PCIE-40GB; A100-SXM4-40GB records show "
        "40339-40536 MiB)"),
    GPU("a100-80gb", ("a100-sxm4-80gb", "a100-sxm-80gb"),
        84_987_740_160, 19.5 * TFLOPS, 156 * TFLOPS, 312 * TFLOPS, 312 * TFLOPS, 2039e9, (8, 0),
        "deviceQuery totalGlobalMem 84987740160 B = 81051 MiB (A100-SXM4-80GB, driver 12.2; "
        "81158-81251 MiB with other drivers)"),
    GPU("a100-pcie-80gb", ("a100-80gb-pcie",),
        84_987_740_160, 19.5 * TFLOPS, 156 * TFLOPS, 312 * TFLOPS, 312 * TFLOPS, 1935e9, (8, 0),
        "estimate: the A100-SXM4-80GB value, assumed equal for PCIe"),
    # NVIDIA H100 Tensor Core GPU datasheet, SXM column: FP32 67 TFLOPS; TF32 989, BF16/FP16
    # 1,979 TFLOPS stated with sparsity (dense = half); 3.35 TB/s.
    GPU("h100-80gb", ("h100-sxm", "h100-sxm-80gb", "h100-80gb-hbm3"),
        _mib(81082), 67 * TFLOPS, 989 * TFLOPS / 2, 1979 * TFLOPS / 2, 1979 * TFLOPS / 2,
        3.35e12, (9, 0),
        "torch total_memory 81082 MiB (NVIDIA H100 80GB HBM3; 81089-81090 in other records)"),
    # Same datasheet, PCIe column: FP32 51; TF32 756, BF16/FP16 1,513 (sparsity); 2 TB/s.
    GPU("h100-pcie-80gb", ("h100-pcie",),
        _mib(81082), 51 * TFLOPS, 756 * TFLOPS / 2, 1513 * TFLOPS / 2, 1513 * TFLOPS / 2, 2.0e12,
        (9, 0), "estimate: the H100 SXM value, assumed equal for PCIe"),
    # NVIDIA H200 Tensor Core GPU datasheet, SXM column: FP32 67; TF32 989, BF16/FP16 1,979
    # (sparsity); 141 GB HBM3e at 4.8 TB/s.
    GPU("h200", ("h200-141gb", "h200-sxm"),
        _mib(143156), 67 * TFLOPS, 989 * TFLOPS / 2, 1979 * TFLOPS / 2, 1979 * TFLOPS / 2,
        4.8e12, (9, 0), "torch total_memory 143156 MiB (NVIDIA H200)"),
    # ---- added for issue 12. Memory: where no recorded torch value was at hand, the datasheet
    # capacity (GB = 10**9 B for HBM/GDDR as NVIDIA/AMD state it, taken as GiB when the board
    # has GiB-sized chips) - marked "estimate"; torch reports a few hundred MiB less, which
    # the 5 % fit margin covers.
    # NVIDIA RTX A6000 datasheet: 48 GB GDDR6, 768 GB/s, FP32 38.7 TFLOPS; NVIDIA Ampere GA102
    # whitepaper, appendix (RTX A6000): TF32 tensor 77.4, FP16/BF16 tensor with FP32
    # accumulate 154.8 TFLOPS dense (pro boards run FP32 accumulate at full rate).
    GPU("rtx-a6000", ("a6000", "rtx a6000", "nvidia rtx a6000"),
        _mib(48 * 1024), 38.7 * TFLOPS, 77.4 * TFLOPS, 154.8 * TFLOPS, 154.8 * TFLOPS, 768e9,
        (8, 6), "estimate: datasheet 48 GB GDDR6"),
    # NVIDIA A40 datasheet: FP32 37.4; TF32 74.8, BF16/FP16 149.7 TFLOPS dense (the sparsity
    # figures are double); 48 GB GDDR6 with ECC, 696 GB/s.
    GPU("a40", ("nvidia a40",),
        _mib(48 * 1024), 37.4 * TFLOPS, 74.8 * TFLOPS, 149.7 * TFLOPS, 149.7 * TFLOPS, 696e9,
        (8, 6), "estimate: datasheet 48 GB GDDR6"),
    # NVIDIA A30 datasheet: FP32 10.3; TF32 82, BF16/FP16 165 TFLOPS dense; 24 GB HBM2, 933 GB/s.
    GPU("a30", ("nvidia a30", "a30-24gb"),
        _mib(24 * 1024), 10.3 * TFLOPS, 82 * TFLOPS, 165 * TFLOPS, 165 * TFLOPS, 933e9, (8, 0),
        "estimate: datasheet 24 GB HBM2"),
    # NVIDIA L40S datasheet: FP32 91.6; TF32 183, BF16/FP16 362.05 TFLOPS dense (366 / 733
    # with sparsity); 48 GB GDDR6, 864 GB/s.
    GPU("l40s", ("nvidia l40s", "l40s-48gb"),
        _mib(48 * 1024), 91.6 * TFLOPS, 183 * TFLOPS, 362.05 * TFLOPS, 362.05 * TFLOPS, 864e9,
        (8, 9), "estimate: datasheet 48 GB GDDR6"),
    # NVIDIA Ada GPU Architecture whitepaper, appendix (GeForce RTX 4080, 16 GB): FP32 48.7;
    # TF32 48.7; FP16/BF16 tensor with FP32 accumulate 97.5 TFLOPS; 716.8 GB/s.
    GPU("rtx-4080", ("4080", "rtx4080", "geforce rtx 4080"),
        _mib(16 * 1024), 48.7 * TFLOPS, 48.7 * TFLOPS, 97.5 * TFLOPS, 97.5 * TFLOPS, 716.8e9,
        (8, 9), "estimate: 16 GB GDDR6X"),
    # GeForce RTX 4070 (46 SMs, 2475 MHz boost, NVIDIA spec page): FP32 29.1 TFLOPS; GeForce
    # Ada runs FP16/BF16 with FP32 accumulate at 2x FP32 (as the RTX 4090 row: 165.2 = 2 x
    # 82.6), TF32 at 1x; 12 GB GDDR6X, 504 GB/s.
    GPU("rtx-4070", ("4070", "rtx4070", "geforce rtx 4070"),
        _mib(12 * 1024), 29.1 * TFLOPS, 29.1 * TFLOPS, 58.3 * TFLOPS, 58.3 * TFLOPS, 504e9,
        (8, 9), "estimate: 12 GB GDDR6X"),
    # Ampere GA102 whitepaper, appendix (GeForce RTX 3080, 10 GB): FP32 29.8; TF32 29.8;
    # FP16/BF16 tensor with FP32 accumulate 59.5 TFLOPS; 760 GB/s.
    GPU("rtx-3080", ("3080", "rtx3080", "geforce rtx 3080"),
        _mib(10 * 1024), 29.8 * TFLOPS, 29.8 * TFLOPS, 59.5 * TFLOPS, 59.5 * TFLOPS, 760e9,
        (8, 6), "estimate: 10 GB GDDR6X"),
    # NVIDIA Tesla P100 datasheet (SXM2 / NVLink): FP32 10.6, FP16 21.2 TFLOPS (no tensor
    # cores: FP16 is 2x FP32 in the CUDA cores); 16 GB HBM2, 732 GB/s. No TF32/BF16.
    GPU("p100-16gb", ("p100", "tesla p100", "p100-sxm2-16gb", "tesla p100-sxm2-16gb",
                      "tesla p100-pcie-16gb"),
        _mib(16 * 1024), 10.6 * TFLOPS, None, 21.2 * TFLOPS, None, 732e9, (6, 0),
        "estimate: datasheet 16 GB HBM2"),
    # NVIDIA HGX B200 datasheet, per GPU (8 per board): FP32 75 TFLOPS; TF32 1.1, FP16/BF16
    # 2.25 PFLOPS dense (2.2 / 4.5 with sparsity); 180 GB HBM3e, 7.7 TB/s.
    GPU("b200", ("b200-180gb", "nvidia b200"),
        180 * 10**9, 75 * TFLOPS, 1100 * TFLOPS, 2250 * TFLOPS, 2250 * TFLOPS, 7.7e12, (10, 0),
        "estimate: datasheet 180 GB HBM3e"),
    # NVIDIA GB200 NVL72 datasheet / 72 GPUs: FP32 5,760 -> 80 TFLOPS; TF32 180 PF sparse ->
    # 1.25 PF dense; FP16/BF16 360 PF sparse -> 2.5 PF dense; HBM3e 13.4 TB -> 186 GB,
    # 576 TB/s -> 8 TB/s.
    GPU("gb200", ("gb200-186gb", "nvidia gb200"),
        186 * 10**9, 80 * TFLOPS, 1250 * TFLOPS, 2500 * TFLOPS, 2500 * TFLOPS, 8e12, (10, 0),
        "estimate: NVL72 datasheet 13.4 TB HBM3e / 72"),
    # AMD Instinct MI250X (ROCm torch sees each of its two GCDs as one device): AMD datasheet
    # for the whole OAM module: FP32 vector 47.9, FP16/BF16 matrix 383 TFLOPS, 128 GB HBM2e,
    # 3.2 TB/s -> per GCD 23.95, 191.5 TFLOPS, 64 GB, 1.6 TB/s. CDNA2 has no TF32.
    GPU("mi250x", ("instinct mi250x", "amd instinct mi250x", "mi250x-gcd", "mi250"),
        64 * 10**9, 23.95 * TFLOPS, None, 191.5 * TFLOPS, 191.5 * TFLOPS, 1.6e12, (9, 0),
        "estimate: datasheet 128 GB HBM2e / 2 GCDs", vendor="amd"),
    # AMD Instinct MI300X datasheet: FP32 vector 81.7; TF32 653.7, FP16/BF16 1,307.4 TFLOPS
    # dense; 192 GB HBM3, 5.3 TB/s. ROCm reports gfx942 as compute capability 9.4.
    GPU("mi300x", ("instinct mi300x", "amd instinct mi300x", "mi300x-192gb"),
        192 * 10**9, 81.7 * TFLOPS, 653.7 * TFLOPS, 1307.4 * TFLOPS, 1307.4 * TFLOPS, 5.3e12,
        (9, 4), "estimate: datasheet 192 GB HBM3", vendor="amd"),
)

# ---- interconnect (issue 13: communication time of data-parallel plans). Bytes/s per
# direction of one GPU, what a ring collective's bus bandwidth is bounded by; vendor GB = 10**9.
# NVLink figures are the datasheets' "NVLink: N GB/s" totals, which count both directions,
# halved. PCIe x16 per direction: gen3 15.75, gen4 31.5, gen5 63 GB/s (PCI-SIG; 128b/130b
# encoding), the figure for cards whose NVLink is a 2-card bridge at most. `network` is the
# per-GPU inter-node link of the usual multi-node system of that generation: DGX A100 has one
# 200 Gb/s HDR InfiniBand adapter per GPU (25 GB/s), DGX H100/H200 and DGX B200 one 400 Gb/s
# NDR adapter per GPU (50 GB/s) (NVIDIA DGX user guides); PCIe and consumer cards assume the
# same 200 Gb/s HDR per GPU - an assumption, the plan says so.
_HDR, _NDR = 25e9, 50e9
_PCIE3, _PCIE4, _PCIE5 = ("pcie3", 15.75e9), ("pcie4", 31.5e9), ("pcie5", 63e9)
_LINKS = {
    # Tesla V100 datasheet (SXM2): NVLink 300 GB/s
    "v100-16gb": (("nvlink2", 150e9), _HDR), "v100-32gb": (("nvlink2", 150e9), _HDR),
    # Tesla V100 datasheet (PCIe): PCIe gen3 32 GB/s (both directions)
    "v100-pcie-16gb": (_PCIE3, _HDR), "v100-pcie-32gb": (_PCIE3, _HDR),
    "t4": (_PCIE3, _HDR),                        # T4 datasheet: PCIe gen3 x16
    "a10g": (_PCIE4, _HDR), "l4": (_PCIE4, _HDR),  # A10 / L4 datasheets: PCIe gen4 x16
    "rtx-3090": (_PCIE4, _HDR), "rtx-4090": (_PCIE4, _HDR), "rtx-4080": (_PCIE4, _HDR),
    "rtx-4070": (_PCIE4, _HDR), "rtx-3080": (_PCIE4, _HDR),   # GeForce: PCIe gen4 x16
    # A100 datasheet: SXM NVLink 600 GB/s; PCIe: PCIe gen4 64 GB/s (NVLink bridge: 2 GPUs)
    "a100-40gb": (("nvlink3", 300e9), _HDR), "a100-80gb": (("nvlink3", 300e9), _HDR),
    "a100-pcie-80gb": (_PCIE4, _HDR),
    # H100 datasheet: SXM NVLink 900 GB/s; PCIe gen5 128 GB/s. H200 datasheet: NVLink 900 GB/s
    "h100-80gb": (("nvlink4", 450e9), _NDR), "h100-pcie-80gb": (_PCIE5, _NDR),
    "h200": (("nvlink4", 450e9), _NDR),
    # RTX A6000, A40, A30, L40S datasheets: PCIe gen4 x16 (A6000/A40/A30 bridges: 2 GPUs)
    "rtx-a6000": (_PCIE4, _HDR), "a40": (_PCIE4, _HDR), "a30": (_PCIE4, _HDR),
    "l40s": (_PCIE4, _HDR),
    "p100-16gb": (("nvlink1", 80e9), _HDR),      # Tesla P100 datasheet: NVLink 160 GB/s
    # HGX B200 datasheet: NVLink 1.8 TB/s per GPU; GB200 NVL72 datasheet: 1.8 TB/s per GPU
    "b200": (("nvlink5", 900e9), _NDR), "gb200": (("nvlink5", 900e9), _NDR),
    # Instinct MI300X datasheet: Infinity Fabric 896 GB/s aggregate peak (both directions);
    # MI250X datasheet: 800 GB/s Infinity Fabric per OAM module (2 GCDs) -> 200 GB/s per GCD
    "mi300x": (("infinity-fabric", 448e9), _NDR), "mi250x": (("infinity-fabric", 200e9), _HDR),
}
_TABLE = tuple(dataclasses.replace(g, link_kind=_LINKS[g.name][0][0], link=_LINKS[g.name][0][1],
                                   network=_LINKS[g.name][1]) if g.name in _LINKS else g
               for g in _TABLE)

GPUS = {g.name: g for g in _TABLE}


def _norm(s: str) -> str:
    s = re.sub(r"[\s_]+", "-", str(s).strip().lower())
    for prefix in ("nvidia-", "tesla-"):
        if s.startswith(prefix):
            s = s[len(prefix):]
    return s


_INDEX = {}
for _g in _TABLE:
    for _a in (_g.name,) + _g.aliases:
        _INDEX.setdefault(_norm(_a), _g)

# ---- names people type: "RTX 3090", "rtx3090-24gb", "A100 80GB", "a100-sxm4-80gb", "H100 SXM"
_DROP = frozenset(("nvidia", "tesla", "geforce", "amd", "instinct", "quadro", "radeon"))
_FORM = {"sxm": "sxm", "sxm2": "sxm", "sxm4": "sxm", "sxm5": "sxm", "pcie": "pcie",
         "nvl": "nvl", "hbm3": None, "hbm3e": None, "hbm2": None, "hbm2e": None}
_MEM_TOKEN = re.compile(r"^(\d+)g(?:b|ib)?$")


def _parts(text: str) -> tuple[str, Optional[int], Optional[str]]:
    """A GPU name -> (model key, memory in GB or None, form factor or None)."""
    tokens = [t for t in re.split(r"[^a-z0-9]+", str(text).lower()) if t and t not in _DROP]
    model, mem, form = [], None, None
    for t in tokens:
        m = _MEM_TOKEN.match(t)
        if m and model:
            mem = int(m.group(1))
        elif t in _FORM:
            form = _FORM[t] or form
        else:
            model.append(t)
    key = "".join(model)
    return (key[3:] if key.startswith("rtx") and len(key) > 3 else key), mem, form


def _entry_keys(g: "GPU") -> tuple[set, set]:
    keys, forms = set(), set()
    for n in (g.name,) + g.aliases:
        k, _, f = _parts(n)
        keys.add(k)
        if f:
            forms.add(f)
    return keys, forms


_ENTRY_KEYS = {_g.name: _entry_keys(_g) for _g in _TABLE}
_CAPACITY = re.compile(r"^(\d+(?:\.\d+)?)\s*(gb|gib|g|mb|mib|kb|kib|tb|tib|t)$",
                       re.IGNORECASE)
#: a single letter is binary, as Slurm's --mem=16G and docker's --memory 16g read it; G and T
#: only (`3080m` is a laptop GPU's name, not 3080 MiB)
_UNITS = {"gb": 10**9, "gib": GiB, "g": GiB, "mb": 10**6, "mib": MiB, "kb": 10**3,
          "kib": 1 << 10, "tb": 10**12, "tib": 1 << 40, "t": 1 << 40}


class NoGPUError(RuntimeError):
    """lookup('auto') found no CUDA GPU."""


def names() -> list:
    """Table names, in table order."""
    return [g.name for g in _TABLE]


def generic(memory_bytes: int, name: Optional[str] = None,
            compute_capability: Optional[Tuple[int, int]] = None) -> GPU:
    """A GPU known only by its capacity (FLOP/s and bandwidth unknown)."""
    return GPU(name or f"generic-{memory_bytes / GiB:.1f}gib", (), int(memory_bytes),
               None, None, None, None, None, compute_capability,
               "given capacity", generic=True)


def _memory_matches(g: GPU, typed: float) -> bool:
    """Whether a size typed with a GPU's name is that SKU's: the size its table name carries
    (v100-16gb: 16, so 'v100-17gb' is no V100), else its memory in GB or GiB within 3 % (a
    T4 typed '16gb' has 14.8 GiB, an H200 '141gb' 139.8 GiB)."""
    named = re.search(r"(\d+)gb", g.name)
    if named:
        return abs(float(named.group(1)) - typed) < 0.5
    return any(abs(size - typed) <= 0.03 * typed
               for size in (g.memory_bytes / GiB, g.memory_bytes / 1e9))


def _by_parts(spec: str) -> Optional[GPU]:
    """Resolve a typed name by model, memory and form factor; an ambiguous one -> the first
    (most common) SKU of the table, with `note` saying which and what else it could be."""
    key, mem, form = _parts(spec)
    if not key:
        return None
    cands = [g for g in _TABLE if key in _ENTRY_KEYS[g.name][0]]
    if mem is not None:
        cands = [g for g in cands if _memory_matches(g, mem)]
    if form is not None:
        exact = [g for g in cands if form in _ENTRY_KEYS[g.name][1]]
        cands = exact or [g for g in cands if not _ENTRY_KEYS[g.name][1]]
    if len(cands) <= 1:
        return cands[0] if cands else None
    note = (f"{spec!r} is ambiguous ({', '.join(g.name for g in cands)}): planned for "
            f"{cands[0].name}, the most common; name one of them to choose")
    return dataclasses.replace(cands[0], note=note)


def _near(spec: str) -> list:
    """Known names like a mistyped one, the likest first: the whole name's matches (memory
    size and form included: 'v10-16gb' -> v100-16gb), then the model key's."""
    import difflib
    key = _parts(spec)[0]
    pool = {k: g.name for g in _TABLE for k in _ENTRY_KEYS[g.name][0] | {g.name}}
    hits = difflib.get_close_matches(_norm(spec), list(pool), n=5, cutoff=0.5) + \
        difflib.get_close_matches(key, list(pool), n=5, cutoff=0.5)
    return list(dict.fromkeys(pool[h] for h in hits))


def lookup(spec: Union[str, GPU]) -> GPU:
    """A GPU from a table name, a name as people type it ('RTX 3090', 'A100 80GB', 'H100 SXM';
    an ambiguous one such as 'a100' -> the most common SKU, `note` says so), a driver name,
    'auto', or a capacity like '24gb' / '16GiB' / '16G' (G and T alone are binary)."""
    if isinstance(spec, GPU):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"GPU spec must be a non-empty string, got {spec!r}")
    key = _norm(spec)
    if key == "auto":
        return detect()
    if key in _INDEX:     # table names, driver names
        return _INDEX[key]
    g = _by_parts(spec)
    if g is not None:
        return g
    m = _CAPACITY.match(spec.strip().replace(" ", ""))
    if m:
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
        if n <= 0:
            raise ValueError(f"GPU capacity must be positive, got {spec!r}")
        return generic(n, name=spec.strip())
    key_part = _parts(spec)[0]
    same_model = [g.name for g in _TABLE if key_part and key_part in _ENTRY_KEYS[g.name][0]]
    near = same_model or _near(spec)   # a known GPU with another memory size: its sizes
    hint = f"did you mean {', '.join(near)}? " if near else ""
    raise ValueError(f"unknown GPU {spec!r}; {hint}known: {', '.join(names())}; or 'auto', or "
                     "a capacity such as 24gb / 16GiB / 16G")


def _detect_raw(index: int = 0):
    """(name, total_memory bytes, compute capability, source) of GPU `index`, or None."""
    try:
        import torch
        if torch.cuda.is_available() and index < torch.cuda.device_count():
            p = torch.cuda.get_device_properties(index)
            return p.name, int(p.total_memory), (p.major, p.minor), "torch total_memory"
    except Exception:  # noqa: BLE001 - fall through to NVML
        pass
    try:
        import pynvml
    except Exception:  # noqa: BLE001
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver
        return None
    try:
        if index >= pynvml.nvmlDeviceGetCount():
            return None
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(h)
        if isinstance(name, bytes):
            name = name.decode()
        total = int(pynvml.nvmlDeviceGetMemoryInfo(h).total)
        try:
            cc = tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h))
        except Exception:  # noqa: BLE001
            cc = None
        # NVML's total can include memory the driver reserves; torch's is what CUDA exposes
        return name, total, cc, "NVML memory total"
    except Exception:  # noqa: BLE001
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def detect(index: int = 0) -> GPU:
    """The GPU of this machine: its table entry with the detected total memory, or a generic
    entry (FLOP/s unknown) for a card that is not in the table."""
    raw = _detect_raw(index)
    if raw is None:
        raise NoGPUError(f"lookup('auto'): no CUDA GPU {index} found (torch.cuda is not "
                         "available and NVML reports none); name one, e.g. v100-16gb, or "
                         "give a capacity such as 24gb")
    name, total, cc, source = raw
    entry = _INDEX.get(_norm(name))
    if entry is None:
        return generic(total, name=name, compute_capability=cc)
    return dataclasses.replace(entry, memory_bytes=total,
                               memory_source=f"detected: {source} of {name}")


def usable_bytes(gpu: Union[str, GPU], overhead: Optional[int] = None,
                 margin: Optional[float] = None) -> int:
    """Bytes PyTorch's allocator may reserve on `gpu` for a plan to count as fitting:
    total memory - overhead (default DEFAULT_OVERHEAD_BYTES, the CUDA context and kernels)
    - margin * total memory (default FIT_MARGIN). Never negative."""
    g = lookup(gpu)
    ov = DEFAULT_OVERHEAD_BYTES if overhead is None else int(overhead)
    mg = FIT_MARGIN if margin is None else float(margin)
    if ov < 0 or not 0.0 <= mg < 1.0:
        raise ValueError(f"usable_bytes: overhead must be >= 0 and margin in [0, 1), "
                         f"got overhead={ov}, margin={mg}")
    return max(0, int(g.memory_bytes - ov - mg * g.memory_bytes))


def table() -> list:
    """The table as JSON-friendly rows (for `memprof gpus --json`)."""
    rows = []
    for g in _TABLE:
        rows.append({"name": g.name, "aliases": list(g.aliases), "memory_bytes": g.memory_bytes,
                     "memory_gib": round(g.memory_gib, 2), "fp32": g.fp32, "tf32": g.tf32,
                     "fp16": g.fp16, "bf16": g.bf16, "bandwidth": g.bandwidth,
                     "compute_capability": g.compute_capability,
                     "usable_bytes": usable_bytes(g), "memory_source": g.memory_source,
                     "vendor": g.vendor, "link": g.link, "link_kind": g.link_kind,
                     "network": g.network})
    return rows


def format_table() -> str:
    """A plain-text table (dense peak TFLOP/s; '-' = not supported)."""
    def tf(x):
        return "-" if x is None else f"{x / TFLOPS:.1f}"

    lines = [f"{'name':<16} {'memory GiB':>10} {'usable GiB':>10} {'fp32':>6} {'tf32':>6} "
             f"{'fp16':>6} {'bf16':>6} {'GB/s':>6}  cc"]
    for g in _TABLE:
        lines.append(f"{g.name:<16} {g.memory_gib:>10.2f} {usable_bytes(g) / GiB:>10.2f} "
                     f"{tf(g.fp32):>6} {tf(g.tf32):>6} {tf(g.fp16):>6} {tf(g.bf16):>6} "
                     f"{g.bandwidth / 1e9:>6.0f}  {g.compute_capability[0]}."
                     f"{g.compute_capability[1]}")
    lines.append(f"usable = total - {DEFAULT_OVERHEAD_BYTES / MiB:.0f} MiB CUDA context - "
                 f"{FIT_MARGIN:.0%} margin; TFLOP/s dense, fp16/bf16 with fp32 accumulate")
    return "\n".join(lines)
