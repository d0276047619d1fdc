"""Convert official releases to scalegen safetensors (and back).

    python -m scalegen.official.convert var  var_d16.pth            -o var_d16.safetensors
    python -m scalegen.official.convert mvar d16.pth                -o mvar_d16.safetensors   # OliverRen/M-VAR
    python -m scalegen.official.convert vae  vae_ch160v4096z32.pth  -o vae_ch160v4096z32.safetensors
    python -m scalegen.official.convert flowar FlowAR-S.pth         -o flowar_s.safetensors   # and kl16 kl16.ckpt
    python -m scalegen.official.convert flexvar FlexVARd16-epo179.pth -o flexvar_d16.safetensors   # and flexvae FlexVAE.pth
    python -m scalegen.official.convert var  var_d16.safetensors    -o var_d16.pth --to-official

Each file is loaded with weights_only=True, every key is mapped by the release's table (scalegen.official.<release>),
the model is built and loaded strictly (missing/unexpected keys are listed), and the architecture is stored
in the safetensors metadata so `scalegen.pretrained.load_generator` rebuilds it without flags.
"""
from __future__ import annotations

import argparse

from scalegen.hub import resolve
from scalegen.official import RELEASES, to_official, to_scalegen

KINDS = tuple(RELEASES)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("src", help="a file, hf://<owner>/<repo>/<file> or a release name (var_d16, vae_var, flowar_s, …)")
    parser.add_argument("-o", "--out", required=True)
    parser.add_argument("--scales", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="the schedule, when not a VAR preset (e.g. 1,2,3,4)")
    parser.add_argument("--to-official", action="store_true", help="scalegen safetensors -> official .pth layout")
    args = parser.parse_args(argv)
    args.src = resolve(args.src, "src")
    if args.to_official:
        to_official(args.kind, args.src, args.out)
    else:
        to_scalegen(args.kind, args.src, args.out, args.scales)


if __name__ == "__main__":
    main()
