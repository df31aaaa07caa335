"""How much subnormal floats cost a training step on this CPU, and what flush_denormal saves.

Adam's moments for weights whose gradient has stopped (MNIST's and dSprites' rarely lit pixels)
decay by 0.9 per step into the subnormal range, where x86 arithmetic is many times slower. This
loads a trained checkpoint (weights and Adam state, as a long run has them), counts the subnormal
entries, and times the same training steps with and without torch.set_flush_denormal on the
checkpoint's own data (dynamically binarized MNIST, dSprites, ...). Each setting runs in a fresh
process: the flag is per thread, and threads started before it is set (PyTorch's intra-op pool)
keep the old one, so it must be set before the first parallel op, as train.py does.

    python benchmarks/subnormals.py --ckpt outputs/train/runs/<time>/checkpoints/last.ckpt
"""

import argparse
import subprocess
import sys
import time

import torch
from picture_memory import cpu_flags  # benchmarks/ is on the path when run as a script

from vaelab import runs
from vaelab.module import VAEModule


def subnormal_count(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    tiny = torch.finfo(torch.float32).tiny
    found = total = 0
    for state in optimizer.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            t = state[key]
            found += int(((t != 0) & (t.abs() < tiny)).sum())
            total += t.numel()
    return found, total


def time_steps(module: VAEModule, optimizer, batches) -> float:
    """ms per step (forward, backward, fused Adam) over `batches`, after 20 warm-up steps."""
    for i, (x, y) in enumerate(batches):
        if i == 20:
            start = time.perf_counter()
        loss = module.objective(module.vae, x, y if module.vae.conditional else None)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / (len(batches) - 20) * 1000


def measure(args) -> None:
    torch.set_flush_denormal(args.flush == 1)  # before any parallel op starts the thread pool
    torch.set_num_threads(args.threads)
    checkpoint = torch.load(args.ckpt, weights_only=True, map_location="cpu")
    run, _ = runs.resolve(None, args.ckpt)
    data = runs.load_data(runs.run_config(run))
    loader = iter(data.train_dataloader())
    batches = [next(loader) for _ in range(args.steps + 20)]
    module = VAEModule.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=True)
    module.train()
    optimizer = torch.optim.Adam(module.vae.parameters(), fused=True)
    optimizer.load_state_dict(checkpoint["optimizer_states"][0])
    found, total = subnormal_count(optimizer)
    ms = time_steps(module, optimizer, batches)
    state = (f"Adam state: {found} of {total} entries subnormal at load, "
             f"{subnormal_count(optimizer)[0]} after {args.steps + 20} steps" if not args.flush
             else "subnormals read as zero")
    print(f"flush_denormal={bool(args.flush)!s:5}: {ms:7.2f} ms/step at batch "
          f"{len(batches[0][0])} ({state})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--flush", type=int, choices=(0, 1), help="one setting, in this process")
    args = parser.parse_args()
    if args.flush is not None:
        return measure(args)
    print(f"CPU flags: {cpu_flags()}; threads {args.threads}; {args.ckpt}", flush=True)
    for flush in (0, 1):
        subprocess.run([sys.executable, __file__, "--ckpt", args.ckpt, "--steps",
                        str(args.steps), "--threads", str(args.threads), "--flush", str(flush)],
                       check=True)


if __name__ == "__main__":
    main()
