"""`vaelab-compress run_dir=... input=... out=...`: images to a real file, with a trained model as
the codec (vaelab.compression); `vaelab-decompress` gives them back. torch and the
run's code are imported once the config has passed, so that `--help` and a bad value answer at
once."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from vaelab import schema
from vaelab.cli import collector_paused, config_dir, reports_user_errors, write_atomically
from vaelab.errors import BadValue

log = logging.getLogger(__name__)


def default_out(run: Path, source: str) -> Path:
    name = source.replace(":", "_") if ":" in source else Path(source).expanduser().name
    return run / "compressed" / f"{name}.vbb"


def compress(cfg: DictConfig) -> dict:
    schema.validate(cfg, schema.Compress)
    if not cfg.input:
        raise BadValue("give input=mnist:test (a split of MNIST or Fashion-MNIST: train, val, "
                       "test) or input=<a folder of images>")
    with collector_paused():
        import torch

        from vaelab import runs
        from vaelab.compression import container, images
        from vaelab.compression.bitsback import BitsBack

    run, ckpt = runs.resolve(cfg.run_dir, cfg.ckpt_path)
    module, _ = runs.load_module(ckpt, cfg.device)
    vae = module.vae
    codec = BitsBack(vae, cfg.precision, cfg.chunk)  # a continuous likelihood stops here
    source = images.read(str(cfg.input), runs.run_config(run), vae.data_shape)
    pictures, labels = source.images, source.labels if vae.conditional else None
    if cfg.limit:
        pictures = pictures[:cfg.limit]
        labels = None if labels is None else labels[:cfg.limit]
    started = time.perf_counter()
    coded = codec.encode(pictures, labels, cfg.seed, None if cfg.lead == "auto" else cfg.lead)
    encode_s = time.perf_counter() - started
    header = {"shape": list(vae.data_shape), "count": len(pictures), "levels": codec.levels,
              "precision": cfg.precision, "chunk": codec.chunk, "labels": labels is not None,
              "target": source.target, "images_sha256": container.images_digest(pictures),
              "model": {"fingerprint": container.fingerprint(vae), "run_dir": str(run.resolve()),
                        "checkpoint": str(ckpt.resolve())},
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "device": str(codec.device)}
    data = container.pack(header, coded)
    out = Path(cfg.out).expanduser() if cfg.out else default_out(run, str(cfg.input))
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, out)
    values = len(pictures) * pictures[0].numel()
    initial_bits = 32 * coded.borrowed
    framing_bits = 8 * (len(data) - 4 * len(coded.words))
    stats = {"file": str(out), "input": str(cfg.input), "images": len(pictures),
             "values_per_image": pictures[0].numel(), "bytes": len(data),
             "bits_per_dim": 8 * len(data) / values,
             "bits_per_dim_coded": (32 * len(coded.words) - initial_bits) / values,
             "overhead_bits": {"initial_words": initial_bits, "header_and_checksum":
                               framing_bits},
             "lead_webp_bits": [8 * size for size in coded.lead_bytes],
             "encode_images_per_s": len(pictures) / encode_s, "encode_s": encode_s,
             "precision": cfg.precision, "chunk": codec.chunk, "chunks": len(coded.sizes),
             "run_dir": str(run), "checkpoint": str(ckpt)}
    if cfg.verify:
        started = time.perf_counter()
        back, back_labels = codec.decode(container.unpack(out)[1], vae.data_shape,
                                         labels is not None)
        stats["decode_s"] = time.perf_counter() - started
        stats["decode_images_per_s"] = len(pictures) / stats["decode_s"]
        if not torch.equal(back, pictures) or (labels is not None
                                               and not torch.equal(back_labels, labels)):
            out.unlink()
            raise RuntimeError("decoding did not give the images back; the file was removed")
        stats["verified"] = True
    write_atomically(out.with_name(out.name + ".json"), json.dumps(stats, indent=2))
    log.info("%d images -> %s: %d bytes, %.4f bits/dim (%d bits of framing and %d initial), "
             "%.0f images/s coding%s", len(pictures), out, len(data), stats["bits_per_dim"],
             framing_bits, initial_bits, stats["encode_images_per_s"],
             f", {stats['decode_images_per_s']:.0f} images/s decoding" if cfg.verify else "")
    return stats


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="compress")
@reports_user_errors
def main(cfg: DictConfig) -> None:
    compress(cfg)


if __name__ == "__main__":
    main()
