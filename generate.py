"""python generate.py run_dir=outputs/train/runs/<time>: see README.md and conf/generate.yaml."""

from vaelab.cli.generate import main

if __name__ == "__main__":
    main()
