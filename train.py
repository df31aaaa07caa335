"""python train.py [overrides]: see README.md and conf/train.yaml."""

from vaelab.cli.train import main

if __name__ == "__main__":
    main()
