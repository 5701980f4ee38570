"""What the GPU benchmarks share: CUDA-graph replays over rotating input sets (baselines that may fail to compile
reported, not fatal), the copy bandwidth every byte
floor is divided by (bytes read + written, measured in the same run), and the card and versions a table names."""

from __future__ import annotations

import datetime
import statistics
import subprocess

import torch
import triton

from dsv4c.codegen.targets import target_for_device


def graph_us(fn, arg_sets: list[tuple], replays: int = 30) -> float:
    """Median microseconds per call of `fn` over CUDA-graph replays that run it once on every input set."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for args in arg_sets[:2]:
            fn(*args)  # compile / autotune outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in arg_sets:
            fn(*args)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(arg_sets))
    return statistics.median(times)


def baseline_us(name: str, fn, arg_sets: list[tuple]) -> float:
    """graph_us for a baseline (Inductor): NaN, with the reason printed, where it cannot compile or be captured,
    so a failing baseline leaves its column empty instead of ending the bench."""
    try:
        return graph_us(fn, arg_sets)
    except Exception as error:  # noqa: BLE001 -- any compile or capture failure of a baseline is reported
        print(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:160]}", flush=True)
        return float("nan")


def kernel_us(fn, arg_sets: list[tuple], rounds: int = 5) -> dict[str, float]:
    """Device microseconds per call of `fn`, kernel by kernel (torch.profiler over graph-free calls on every input
    set, so each launch is seen by name and host gaps do not count), largest first."""
    from torch.profiler import ProfilerActivity, profile

    for args in arg_sets[:2]:
        fn(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(rounds):
            for args in arg_sets:
                fn(*args)
        torch.cuda.synchronize()
    calls = rounds * len(arg_sets)
    times = {e.key: e.self_device_time_total / calls for e in prof.key_averages()
             if e.device_type.name == "CUDA" and e.self_device_time_total > 0}
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def copy_gbps() -> float:
    """Device-to-device copy bandwidth (bytes read + written), median of a 1 GiB copy."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=50, return_mode="median")
    return 2 * src.numel() * 4 / ms / 1e6


def environment() -> dict:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    return dict(card=torch.cuda.get_device_name(), nvidia_smi=smi, torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                target=target_for_device("cuda").name)
