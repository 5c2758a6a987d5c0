"""Where a noisy training step's extra time goes: torch.profiler over clean and noisy fwd+bwd steps (issue 7).

Same workload and flags as ``noise_overhead.py`` (it reuses its model and step builders). Prints, for one clean and
one noisy configuration, the median step time, the top operators by self CPU time and by device time, and the
step time with telemetry sampling off (``telemetry_rate=0``), to separate host-side cost from kernel cost.
    python benchmarks/profile_noise_step.py --layers 4 --tokens 8192 --ops linear
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from noise_overhead import _sync, build, make_steps, parse  # noqa: E402

from noisebench.noise import NoiseInjector, NoiseSpec  # noqa: E402


def median_ms(fn, device: str, n: int = 8) -> float:
    times = []
    for i in range(n + 2):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        if i >= 2:
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def main() -> None:
    a = parse()
    model = build(a)
    x = torch.randn(a.tokens // a.seq, a.seq, a.hidden, device=a.device, dtype=next(model.parameters()).dtype,
                    requires_grad=False)
    ops = a.ops.split(",")
    phases = ["train_forward", "train_backward"]
    clean = NoiseInjector(NoiseSpec())
    print(f"device={a.device} layers={a.layers} tokens={a.tokens} ops={ops} scale={a.scale}")
    with clean:
        base = median_ms(make_steps(model, x, clean)["fwd+bwd"], a.device)
    print(f"clean fwd+bwd: {base:.2f} ms")
    for rate in (None, 0.0):
        kw = {} if rate is None else {"telemetry_rate": rate}
        inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=a.scale, ops=ops, phases=phases, **kw))
        inj.attach(model)   # as the trainer does (module scopes by name; hooks skip classes that cannot matter)
        with inj:
            ms = median_ms(make_steps(model, x, inj)["fwd+bwd"], a.device)
        inj.detach(model)
        print(f"noisy fwd+bwd (telemetry_rate={'default' if rate is None else rate}): {ms:.2f} ms, x{ms / base:.2f}")
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=a.scale, ops=ops, phases=phases))
    inj.attach(model)
    step = make_steps(model, x, inj)["fwd+bwd"]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device.startswith("cuda") else [])
    with inj:
        step()
        with profile(activities=acts) as prof:
            for _ in range(3):
                step()
            _sync(a.device)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))
    if a.device.startswith("cuda"):
        print(events.table(sort_by="self_cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
