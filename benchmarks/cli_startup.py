"""How fast the command line answers when there is nothing to train: `--help`, `--cfg job`,
`--info` and a bad config value, against `python -c "import torch"` on the same machine. The entry
points import torch and Lightning only once a config has passed, so each of these should take
less time than importing torch alone.

    python benchmarks/cli_startup.py            # 5 rounds, median
"""

import argparse
import statistics
import subprocess
import sys
import time

import record

COMMANDS = {
    'python -c "import torch"': ["-c", "import torch"],
    "python train.py --help": ["train.py", "--help"],
    "python train.py --cfg job": ["train.py", "--cfg", "job"],
    "python train.py --info": ["train.py", "--info"],
    "python train.py latent_dim=0 (a config error)": ["train.py", "latent_dim=0"],
    "python eval.py --help": ["eval.py", "--help"],
    "python generate.py --help": ["generate.py", "--help"],
}


def seconds(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=record.ROOT, capture_output=True, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):  # taking turns, so a slow minute hits every command alike
        for name, command in COMMANDS.items():
            times[name].append(seconds(command))
    torch_s = statistics.median(times['python -c "import torch"'])
    rows = []
    for name, found in times.items():
        median = statistics.median(found)
        rows.append([f"`{name}`", round(median, 2), round(median / torch_s, 2)])
        print(f"{name:<50} {median:6.2f} s  {median / torch_s:5.2f}x import torch")
    record.write("cli_startup", "The command line without training: median wall time",
                 ["command", "seconds", "/ import torch"], rows,
                 [f"median of {args.rounds} rounds taken in turns, each command a fresh process"])


if __name__ == "__main__":
    main()
