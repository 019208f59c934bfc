"""What the Python tests share: the devices they run on, input builders, the case type, the argument packers
of the ops, the references (run on the CPU) and the tolerances derived from them.

Inputs are drawn on the CPU, so that they are the same values whatever the device, rounded to the test dtype
there, then moved to the device; references run on the CPU, in float64 unless a test asks for the same math
in a lower precision (to measure how much rounding a dtype costs).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from reference import nystrom_reference

# =============================================================================================
# Devices
# =============================================================================================

ENV_DEVICE = "NYSTROM_TEST_DEVICE"


def _cuda_compile_backends() -> Tuple[str, ...]:
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return ("aot_eager",)
    return ("aot_eager", "inductor") if has_triton() else ("aot_eager",)


@dataclass(frozen=True)
class Device:
    """A device the tests run on and what it can do; a new device is one more entry of DEVICES."""

    name: str  # what NYSTROM_TEST_DEVICE lists, and the test id
    type: str  # torch device type of its tensors (an emulated device may serve CPU tensors)
    available: Callable[[], bool]
    by_default: bool  # among devices() when NYSTROM_TEST_DEVICE is unset (if available)
    cuda_backend: bool = False  # runs the CUDA backend: its Newton–Schulz paths, its tensor-core kernels
    streams: bool = False  # its work is ordered by torch.cuda streams
    peak_memory: bool = False  # torch.cuda.max_memory_allocated measures its allocations
    count: Callable[[], int] = lambda: 1  # how many such devices the host has (a second one: two-device tests)
    bitwise: bool = True  # calls that differ only in what must not matter (values in the padding, the stream,
    #                       the Python thread) are compared bitwise; otherwise within float32 rounding
    half_rounds_products: bool = False  # float16 / bfloat16 inputs may see products rounded to that dtype
    #                                     (tensor cores), not only float32 arithmetic
    checks_data: bool = True  # refuses bad tensor values (every key of an element masked) with an error; the
    #                           CUDA backend does not read them back (no host sync) and gives NaN rows instead
    other_device: str = "meta"  # where the odd tensor of a "tensor on another device" case lives
    compile_backends: Callable[[], Tuple[str, ...]] = lambda: ("aot_eager",)
    unavailable: str = ""  # why it may be missing, for the error message

    @property
    def torch(self) -> torch.device:
        return torch.device(self.type)

    def synchronize(self) -> None:
        if self.type == "cuda":
            torch.cuda.synchronize()

    def __str__(self) -> str:
        return self.name


def emulated_library() -> bool:
    """Whether this process loaded the emulated CUDA backend (NYSTROM_LIBRARY=.../libnystrom_emulated.so, as
    scripts/test_emulated.sh does): it serves CPU tensors with the CUDA glue and kernels, so the CPU backend is
    not in this process."""
    try:
        import torch_nystrom
    except ImportError:
        return False
    return torch_nystrom.emulated()


DEVICES: Dict[str, Device] = {
    d.name: d
    for d in (
        Device("cpu", "cpu", available=lambda: not emulated_library(), by_default=True,
               unavailable="this process loaded the emulated CUDA backend, which serves CPU tensors instead "
                           "(NYSTROM_LIBRARY); the CPU backend runs in a process without it"),
        # The CUDA backend on the CPU under the emulation of the CUDA execution model (cuda/emu/): the real
        # glue and kernels, CPU tensors. One schedule of the block's threads per process
        # (NYSTROM_EMU_SCHEDULE); scripts/test_emulated.sh runs the suite under several.
        Device("emu", "cpu", available=emulated_library, by_default=False, cuda_backend=True,
               half_rounds_products=True, checks_data=False,
               unavailable="the emulated CUDA backend is not loaded: run scripts/test_emulated.sh, or set "
                           "NYSTROM_LIBRARY to build/libnystrom_emulated.so (cmake -DNYSTROM_BUILD_EMULATION=ON)"),
        Device("cuda", "cuda", available=torch.cuda.is_available, by_default=True, cuda_backend=True, streams=True,
               peak_memory=True, count=torch.cuda.device_count, bitwise=False, half_rounds_products=True, checks_data=False,
               other_device="cpu", compile_backends=_cuda_compile_backends,
               unavailable="torch.cuda.is_available() is False (no GPU, no driver, or a CPU-only torch)"),
    )
}


def requested_devices() -> Optional[List[str]]:
    """The names NYSTROM_TEST_DEVICE lists (comma-separated), None when it is unset or empty.

    Raises ValueError for a name that is not in DEVICES."""
    raw = os.environ.get(ENV_DEVICE, "").strip()
    if not raw:
        return None
    names = []
    for name in (n.strip().lower() for n in raw.split(",")):
        if not name:
            continue
        if name not in DEVICES:
            raise ValueError(f"{ENV_DEVICE}={raw!r}: unknown device {name!r}; known: {', '.join(DEVICES)}")
        if name not in names:
            names.append(name)
    return names or None


def devices() -> List[str]:
    """The names of the devices the per-device tests run on.

    NYSTROM_TEST_DEVICE unset: every device that is on by default and available ("cpu", and "cuda" when
    torch sees a GPU). Set: exactly the devices it lists, available or not; a listed device that is not
    available fails the tests that use it (device()) instead of skipping them."""
    names = requested_devices()
    if names is None:
        return [n for n, d in DEVICES.items() if d.by_default and d.available()]
    return names


class DeviceUnavailable(RuntimeError):
    pass


def device(name: str) -> Device:
    """The Device of that name; DeviceUnavailable if it is not available on this host."""
    d = DEVICES[name]
    if not d.available():
        raise DeviceUnavailable(f"{ENV_DEVICE} asks for device {name!r}, which is not available here: {d.unavailable}")
    return d


AnyDevice = Union[Device, torch.device, str]


def torch_device(d: AnyDevice) -> torch.device:
    """torch.device of a Device, of a DEVICES name, or of a torch device string ("meta", "cuda:1")."""
    if isinstance(d, Device):
        return d.torch
    if isinstance(d, str) and d in DEVICES:
        return DEVICES[d].torch
    return torch.device(d)


def to_device(x, d: AnyDevice):
    """x (a tensor, an nn.Module, a dict or tuple of them, anything else unchanged) on device d."""
    if isinstance(x, (torch.Tensor, torch.nn.Module)):
        return x.to(torch_device(d))
    if isinstance(x, dict):
        return {n: to_device(v, d) for n, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, d) for v in x)
    return x


def run_slow(request) -> bool:
    """Slow tests run only when asked for: any -m expression that selects them (e.g. -m slow), or
    NYSTROM_RUN_SLOW=1. A plain `pytest tests/python` skips them."""
    return bool(request.config.getoption("markexpr", "")) or os.environ.get("NYSTROM_RUN_SLOW") == "1"


# =============================================================================================
# Inputs
# =============================================================================================

FLOAT_IDS = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def make_qkv(B, H, L, S, D, Dv=None, dtype=torch.float64, std=1.0, requires_grad=False, seed=None):
    """Random q (B,H,L,D), k (B,H,S,D), v (B,H,S,Dv) on the CPU."""
    if Dv is None:
        Dv = D
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    q = (torch.randn(B, H, L, D, dtype=torch.float64, generator=g) * std).to(dtype)
    k = (torch.randn(B, H, S, D, dtype=torch.float64, generator=g) * std).to(dtype)
    v = torch.randn(B, H, S, Dv, dtype=torch.float64, generator=g).to(dtype)
    if requires_grad:
        q.requires_grad_(True)
        k.requires_grad_(True)
        v.requires_grad_(True)
    return q, k, v


def trailing_mask(B: int, n: int, real_lengths) -> torch.Tensor:
    """Bool (B, n), True = padding, with the first real_lengths[b] tokens real."""
    mask = torch.ones(B, n, dtype=torch.bool)
    for b, r in enumerate(real_lengths):
        mask[b, :r] = False
    return mask


def middle_mask(B: int, n: int, holes) -> torch.Tensor:
    """Bool (B, n) with padding in [lo, hi) for holes[b] = (lo, hi)."""
    mask = torch.zeros(B, n, dtype=torch.bool)
    for b, (lo, hi) in enumerate(holes):
        mask[b, lo:hi] = True
    return mask


def random_mask(B: int, n: int, p: float = 0.3, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random bool (B, n) padding with at least one real token per row."""
    mask = torch.rand(B, n, generator=generator) < p
    mask[:, 0] = False
    return mask


def trailing(*real_lengths: int) -> tuple:
    """Mask spec of a Case: the first real_lengths[b] tokens of element b are real."""
    return ("trailing", list(real_lengths))


def middle(*holes: Tuple[int, int]) -> tuple:
    """Mask spec of a Case: element b is padded in [lo, hi) for holes[b] = (lo, hi)."""
    return ("middle", list(holes))


def scattered(p: float) -> tuple:
    """Mask spec of a Case: each token padded with probability p (token 0 stays real)."""
    return ("random", p)


def build_mask(spec: Optional[tuple], B: int, n: int, seed: int) -> Optional[torch.Tensor]:
    """A (B, n) CPU padding mask from a mask spec (trailing / middle / scattered), None for None."""
    if spec is None:
        return None
    kind, arg = spec
    if kind == "trailing":
        return trailing_mask(B, n, arg)
    if kind == "middle":
        return middle_mask(B, n, arg)
    if kind == "random":
        return random_mask(B, n, arg, torch.Generator().manual_seed(seed))
    raise ValueError(f"unknown mask spec {spec!r}")


@dataclass
class Case:
    """One call of the op: sizes, masks, options. Odd sizes by default (no dimension a power of two,
    uneven landmark segments)."""

    id: str
    B: int = 2
    H: int = 3
    L: int = 37
    S: int = 53
    D: int = 19
    Dv: int = 23
    m: int = 7
    key_mask: Optional[tuple] = None  # trailing(...), middle(...) or scattered(p)
    query_mask: Optional[tuple] = None
    std: float = 1.0
    extra: dict = field(default_factory=dict)  # more keyword arguments (pinv_init, scale, pinv_iterations)

    def build(self, dtype, device: AnyDevice = "cpu", requires_grad=False, seed=0):
        """q, k, v and the keyword arguments of nystrom_attention (masks included), on the device."""
        q, k, v = make_qkv(self.B, self.H, self.L, self.S, self.D, self.Dv, dtype=dtype, std=self.std, seed=seed)
        kw = {"num_landmarks": self.m, **self.extra}
        kpm = build_mask(self.key_mask, self.B, self.S, seed + 1)
        qpm = build_mask(self.query_mask, self.B, self.L, seed + 2)
        if kpm is not None:
            kw["key_padding_mask"] = kpm
        if qpm is not None:
            kw["query_padding_mask"] = qpm
        q, k, v = (t.to(torch_device(device)).requires_grad_(requires_grad) for t in (q, k, v))
        return q, k, v, to_device(kw, device)

    @property
    def out_shape(self) -> Tuple[int, int, int, int]:
        return (self.B, self.H, self.L, self.Dv)


# =============================================================================================
# The ops' arguments
# =============================================================================================

ARG_NAMES = ("query", "key", "value", "num_landmarks", "pinv_iterations", "pinv_init",
             "key_padding_mask", "query_padding_mask", "scale")
SAVED_NAMES = ("out", "q_landmarks", "k_landmarks", "bv", "zbv", "lse_query", "lse_landmark", "pinv_scale")


def ops_args(q, k, v, kw) -> tuple:
    """The 9 positional arguments of torch.ops.nystrom.nystrom_attention(_forward)."""
    return (q, k, v, kw.get("num_landmarks", 64), kw.get("pinv_iterations", 6), kw.get("pinv_init", "per_head"),
            kw.get("key_padding_mask"), kw.get("query_padding_mask"), kw.get("scale"))


def backward_args(grad_out, args, saved) -> tuple:
    """Arguments of nystrom_attention_backward, matched to its schema by name (independent of its order)."""
    values = {"grad_out": grad_out, **dict(zip(ARG_NAMES, args)), **dict(zip(SAVED_NAMES, saved))}
    schema = torch.ops.nystrom.nystrom_attention_backward.default._schema
    return tuple(values[a.name] for a in schema.arguments)


def opcheck_samples(device: AnyDevice, requires_grad: bool) -> List[tuple]:
    """ops_args of small calls for torch.library.opcheck: both Newton–Schulz paths of the CUDA backend
    (m <= 64 / above; m = 130 > 128 for float32), all four dtypes, with and without masks."""
    samples = []
    for case, dtype in [
        (Case("masks_uneven", B=2, H=2, L=7, S=9, D=3, Dv=4, m=3, key_mask=trailing(9, 5),
              query_mask=trailing(7, 5)), torch.float64),
        (Case("nomask", B=1, H=2, L=5, S=6, D=3, Dv=2, m=2,
              extra=dict(pinv_init="original", scale=0.5, pinv_iterations=2)), torch.float32),
        (Case("half_m80", B=2, H=1, L=100, S=90, D=8, Dv=5, m=80, key_mask=trailing(90, 85),
              query_mask=middle((3, 5), (0, 0))), torch.float16),
        (Case("bf16_m20", B=1, H=2, L=40, S=30, D=64, Dv=64, m=20, key_mask=scattered(0.2)), torch.bfloat16),
        (Case("f32_m130", B=1, H=1, L=140, S=150, D=8, Dv=4, m=130), torch.float32),
    ]:
        q, k, v, kw = case.build(dtype, device, requires_grad=requires_grad)
        samples.append(ops_args(q, k, v, kw))
    return samples


# =============================================================================================
# References and tolerances
# =============================================================================================

# Relative to the largest entry of the reference. float64 above 64 landmarks: Newton–Schulz amplifies the
# rounding of A's entries on large, ill-conditioned landmark matrices (LARGE_M_F64: output, gradients).
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 2e-4}
LARGE_M_F64 = (1e-9, 1e-7)


def base_tolerance(dtype, num_landmarks: int, grad: bool = False) -> float:
    """The fixed part of the tolerance of an output (or gradient) in float64 / float32 with that many landmarks."""
    if dtype == torch.float64 and num_landmarks > 64:
        return LARGE_M_F64[grad]
    return (GRAD_TOL if grad else TOL)[dtype]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (in float64, on the CPU)."""
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    denom = e.abs().max().item() if e.numel() else 0.0
    diff = (a - e).abs().max().item() if a.numel() else 0.0
    return diff / denom if denom > 0 else diff


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "output"):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.isfinite(actual.detach().double()).all(), f"{what}: non-finite values"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def reference(q, k, v, kw, grad_out=None, compute_dtype=torch.float64):
    """The reference on the CPU at the values of (device) tensors q, k, v; with grad_out also its gradients
    with respect to q, k, v. Returns (out, grads or None), on the CPU, in compute_dtype."""
    leaves = [t.detach().cpu().to(compute_dtype).requires_grad_(grad_out is not None) for t in (q, k, v)]
    out = nystrom_reference(*leaves, compute_dtype=compute_dtype, **to_device(kw, "cpu"))
    if grad_out is None:
        return out, None
    grads = torch.autograd.grad(out, leaves, grad_out.detach().cpu().to(compute_dtype))
    return out.detach(), grads


def float32_tolerance(base: float, ref32: torch.Tensor, ref64: torch.Tensor) -> float:
    """Tolerance of a float32 result: the larger of `base` and 20x the error of the same math done in float32
    (the reference with compute_dtype=float32), which Newton–Schulz amplifies on large, ill-conditioned A."""
    return max(base, 20 * rel_err(ref32, ref64))


def expected_output(q, k, v, kw, dtype) -> Tuple[torch.Tensor, float]:
    """The float64 reference output and the tolerance of an output in `dtype` (float64 or float32)."""
    ref, _ = reference(q, k, v, kw)
    tol = base_tolerance(dtype, kw.get("num_landmarks", 64))
    if dtype == torch.float32:
        tol = float32_tolerance(tol, reference(q, k, v, kw, compute_dtype=torch.float32)[0], ref)
    return ref, tol


def expected_gradients(q, k, v, kw, grad_out, dtype) -> Tuple[tuple, List[float]]:
    """The float64 reference's gradients (dq, dk, dv) at grad_out, and the tolerance of each in `dtype`."""
    _, grads = reference(q, k, v, kw, grad_out=grad_out)
    base = base_tolerance(dtype, kw.get("num_landmarks", 64), grad=True)
    if dtype != torch.float32:
        return grads, [base] * 3
    _, grads32 = reference(q, k, v, kw, grad_out=grad_out, compute_dtype=torch.float32)
    return grads, [float32_tolerance(base, a, e) for a, e in zip(grads32, grads)]


def half_precision_bound(plain_err: float) -> float:
    """What a float16 / bfloat16 result may lose against the float64 reference: twice the error of the same
    algorithm written in plain PyTorch at that precision, plus 1e-3 (a plain composition that breaks down,
    non-finite, allows 1)."""
    if not math.isfinite(plain_err):
        plain_err = 0.5
    return 2 * plain_err + 1e-3


def cpu_bf16_products() -> bool:
    """Whether this process's CPU backend multiplies bfloat16 inputs on vdpbf16ps (NYSTROM_CPU_BF16,
    docs/DESIGN.md §5): the library's answer through torch_nystrom._C, else isa.cpp's rule from the CPU flags."""
    import torch_nystrom.info

    cpu = torch_nystrom.info.build_info().get("cpu")
    if cpu is not None and "bf16_products" in cpu:
        return bool(cpu["bf16_products"])
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return False
    has = " avx512_bf16" in info and os.environ.get("NYSTROM_CPU_SIMD", "") in ("", "avx512")
    want = os.environ.get("NYSTROM_CPU_BF16", "")
    if want in ("0", "1"):
        return has and want == "1"
    return has and "AuthenticAMD" in info


def check_low_precision(actual, ref, plain, dtype, device: Device, what="output", grad=False):
    """A float16 / bfloat16 result against the float64 reference `ref` and the plain composition at that
    precision `plain` (reference with compute_dtype=dtype).

    Every device: within half_precision_bound. A device whose arithmetic is float32 (no product rounded to
    the half dtype: not the CPU's bfloat16 products on vdpbf16ps) also: an output within 4x the error of rounding the exact result to the dtype plus 2 ulp
    of float32; a gradient within 8 ulp of the dtype (sums of many products of half-precision factors)."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err, plain_err = rel_err(actual, ref), rel_err(plain, ref)
    assert err <= half_precision_bound(plain_err), f"{what}: error {err:.3e}, plain composition {plain_err:.3e}"
    if device.half_rounds_products or (device.name == "cpu" and dtype == torch.bfloat16 and cpu_bf16_products()):
        return
    if grad:
        allowed = 8 * torch.finfo(dtype).eps
        assert err <= allowed, f"{what}: relative error {err:.3e} > {allowed:.3e}"
        return
    rounding = (ref.to(dtype).double() - ref).abs().max().item()
    abs_err = (actual.detach().cpu().double() - ref).abs().max().item()
    allowed = 4 * rounding + 2 * torch.finfo(torch.float32).eps * ref.abs().max().item()
    assert abs_err <= allowed, f"{what}: max error {abs_err:.3e} > {allowed:.3e} (rounding alone {rounding:.3e})"


def cotangent(shape, dtype, device: AnyDevice = "cpu", seed=0) -> torch.Tensor:
    """A random output gradient, drawn on the CPU (the same whatever the device), on the device."""
    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 100))
    return g.to(dtype).to(torch_device(device))


def check_padded_rows_zero(out, kw):
    qpm = kw.get("query_padding_mask")
    if qpm is not None:
        rows = out.detach()[qpm[:, None, :, None].expand_as(out)]
        assert torch.count_nonzero(rows) == 0, "rows of padded queries must be exactly 0"


def check_padded_grads_zero(grads, kw):
    """Padded tokens do not influence the output: the gradients (dq, dk, dv) there are exactly zero."""
    kpm, qpm = kw.get("key_padding_mask"), kw.get("query_padding_mask")
    if kpm is not None:
        sel = kpm[:, None, :, None]
        assert torch.count_nonzero(grads[1].masked_select(sel)) == 0, "dk at padded keys"
        assert torch.count_nonzero(grads[2].masked_select(sel)) == 0, "dv at padded keys"
    if qpm is not None:
        assert torch.count_nonzero(grads[0].masked_select(qpm[:, None, :, None])) == 0, "dq at padded queries"


def assert_same(a, b, what: str, bitwise: bool, tol: float = 1e-6):
    """Results (sequences of tensors) that must not differ: bitwise, or else within `tol` (relative)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if bitwise:
            assert torch.equal(x, y), f"{what}: result {i} differs (max |diff| {(x - y).abs().max().item():.3e})"
        else:
            assert_rel_close(x, y, tol, f"{what}: result {i}")


# =============================================================================================
# The CPU backend, also from a process that loaded the emulated CUDA backend
# =============================================================================================

_CPU_BACKEND_CHILD = r"""
import importlib, sys, torch
sys.path.insert(0, sys.argv[1])
module, function, args = torch.load(sys.argv[2], weights_only=False)
torch.save(getattr(importlib.import_module(module), function)(*args), sys.argv[3])
"""


def on_cpu_backend(module: str, function: str, *args):
    """`module.function(*args)` (CPU tensors in, CPU tensors out) computed by the CPU backend: here, or, when
    this process loaded the emulated CUDA backend (which then serves CPU tensors), in a child process that
    loads the ordinary library. `module` is importable from tests/python."""
    if not emulated_library():
        import importlib

        return getattr(importlib.import_module(module), function)(*args)
    import subprocess
    import sys
    import tempfile

    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k not in ("NYSTROM_LIBRARY", ENV_DEVICE)}
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "args.pt"), os.path.join(tmp, "result.pt")
        torch.save((module, function, args), src)
        subprocess.run([sys.executable, "-c", _CPU_BACKEND_CHILD, here, src, dst], check=True, env=env, timeout=600)
        return torch.load(dst, weights_only=False)


def attention_and_gradients(q, k, v, kw, grad_out):
    """The op's output and (dq, dk, dv) at grad_out, for CPU tensors (on_cpu_backend's unit of work)."""
    import torch_nystrom

    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = torch_nystrom.nystrom_attention(*leaves, **kw)
    return out.detach(), torch.autograd.grad(out, leaves, grad_out)
