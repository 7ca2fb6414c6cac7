"""A guard around torch.distributed's tensor collectives, for tests of the GPU path on a CPU.

Under NCCL every buffer of a collective must live on the rank's GPU: an output buffer made on
the CPU for a GPU input (`torch.zeros_like(cpu_tensor)` beside `x.to(device)`) is a crash on a
GPU node that gloo on a CPU never shows. `install()` wraps the collectives so that each call
checks that every output buffer is on its input's device (AssertionError naming the collective
and both devices otherwise), and optionally appends one line per call to a log file, so a test
can see that the guard really watched the run.

Run a script under the guard with `python tests/collective_guard.py SCRIPT ARGS...` (torchrun
takes it as its script): HFT_GUARD_LOG=<prefix> logs to <prefix>.<rank>.
"""
import inspect
import os
import runpy
import sys

import torch
import torch.distributed as dist

# name -> (output argument, input argument); FSDP2 calls the *_single ones.
PAIRS = {"all_gather": ("tensor_list", "tensor"),
         "all_gather_into_tensor": ("output_tensor", "input_tensor"),
         "all_gather_single": ("output_tensor", "input_tensor"),
         "reduce_scatter_tensor": ("output", "input"), "reduce_scatter_single": ("output", "input"),
         "reduce_scatter": ("output", "input_list"), "all_to_all_single": ("output", "input"),
         "all_reduce": (None, "tensor"), "broadcast": (None, "tensor")}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


def check(name: str, bound: dict):
    """Raise when an output buffer of collective `name` is not on its input's device."""
    out_key, in_key = PAIRS[name]
    inputs = _tensors(bound.get(in_key))
    if out_key is None or not inputs:
        return [str(t.device) for t in inputs]
    want = inputs[0].device
    for t in _tensors(bound.get(out_key)):
        if t.device != want:
            raise AssertionError(f"collective {name}: an output buffer is on {t.device} but the "
                                 f"input is on {want}; under NCCL both must be on the rank's GPU")
    return [str(want)]


def install(log_path: str | None = None):
    """Wrap torch.distributed's tensor collectives (idempotent); returns a function that undoes
    it."""
    originals = {name: getattr(dist, name) for name in PAIRS}
    for name in PAIRS:
        orig = getattr(dist, name)
        if getattr(orig, "_guarded", False):
            continue

        def wrapped(*args, _orig=orig, _name=name, _sig=inspect.signature(orig), **kwargs):
            devices = check(_name, _sig.bind(*args, **kwargs).arguments)
            if log_path:
                with open(log_path, "a") as f:
                    f.write(f"{_name} {' '.join(devices)}\n")
            return _orig(*args, **kwargs)

        wrapped._guarded = True
        setattr(dist, name, wrapped)
    return lambda: [setattr(dist, name, f) for name, f in originals.items()]


if __name__ == "__main__":
    prefix = os.environ.get("HFT_GUARD_LOG")
    install(f"{prefix}.{os.environ.get('RANK', '0')}" if prefix else None)
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
