"""python eval.py run_dir=outputs/train/runs/<time>: see README.md and conf/eval.yaml."""

from vaelab.cli.eval import main

if __name__ == "__main__":
    main()
