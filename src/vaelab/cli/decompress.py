"""`vaelab-decompress <file> [out=<folder>]`: the images of a vaelab-compress file, byte for byte,
checked against the file's checksums and its model's fingerprint before anything is written."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from vaelab import schema
from vaelab.cli import collector_paused, config_dir, reports_user_errors
from vaelab.errors import BadValue

log = logging.getLogger(__name__)


def decompress(cfg: DictConfig) -> list[Path]:
    schema.validate(cfg, schema.Decompress)
    if not cfg.file:
        raise BadValue("give the file to decompress: vaelab-decompress <file> [out=<folder>]")
    with collector_paused():
        import torch

        from vaelab import runs
        from vaelab.compression import container, images
        from vaelab.compression.bitsback import BitsBack, CodingMismatch

    path = Path(cfg.file).expanduser()
    header, coded = container.unpack(path)
    model = header["model"]
    if cfg.run_dir or cfg.ckpt_path:
        run, ckpt = runs.resolve(cfg.run_dir, cfg.ckpt_path)
    else:
        run, ckpt = runs.resolve(model["run_dir"], model["checkpoint"])
    module, _ = runs.load_module(ckpt, cfg.device)
    vae = module.vae
    if container.fingerprint(vae) != model["fingerprint"]:
        raise BadValue(f"{path} was compressed with another model (weights "
                       f"{model['fingerprint'][:12]}, from {model['run_dir']}); {ckpt} holds "
                       f"weights {container.fingerprint(vae)[:12]}. Give run_dir= the run it "
                       f"was compressed with")
    if header["threads"] != torch.get_num_threads():
        torch.set_num_threads(header["threads"])  # the same arithmetic as when compressing
    codec = BitsBack(vae, header["precision"], header["chunk"])
    mismatch = BadValue(
        f"{path} decodes to images that fail their checksum: this setup computes the model's "
        f"probabilities differently from the one that compressed it (torch {header['torch']} on "
        f"{header['device']}, here torch {torch.__version__} on {codec.device}). Decompress "
        f"with that torch version on that kind of device; nothing was written")
    try:
        pictures, labels = codec.decode(coded, header["shape"], header["labels"])
    except (CodingMismatch, ValueError, RuntimeError) as err:
        raise mismatch from err
    if len(pictures) != header["count"] or \
            container.images_digest(pictures) != header["images_sha256"]:
        raise mismatch
    out = Path(cfg.out).expanduser() if cfg.out else path.with_suffix("")
    written = images.write(header["target"], pictures, labels, out)
    log.info("%s -> %d images in %s", path, len(pictures), out)
    return written


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="decompress")
@reports_user_errors
def run(cfg: DictConfig) -> None:
    decompress(cfg)


def main() -> None:
    """`vaelab-decompress <file> ...`: the file may come first, without `file=`."""
    args = sys.argv[1:]
    if args and "=" not in args[0] and not args[0].startswith("-"):
        quoted = args[0].replace("\\", "\\\\").replace('"', '\\"')
        sys.argv[1:] = [f'file="{quoted}"', *args[1:]]
    run()


if __name__ == "__main__":
    main()
