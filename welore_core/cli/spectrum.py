"""`welore spectrum MODEL`: singular values of every target matrix (cached for compress)."""

from __future__ import annotations

import argparse

from .common import add_device_flag, add_json_flag, emit, progress_for


def register(sub) -> None:
    p = sub.add_parser("spectrum", help="singular values of every target matrix (cached)")
    p.add_argument("model", help="registry name, .gguf file, model directory or WeLore checkpoint")
    add_device_flag(p)
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..compression.allocation import normalise
    from ..loading import load_model
    from ..spectrum import SpectrumCache, compute_spectra
    from ..targets import short_name

    loaded = load_model(args.model, device=args.device)
    with progress_for(args) as bar:
        spectra = compute_spectra(loaded.model, SpectrumCache.configured(), bar)
    rows = []
    for name, shape, S in zip(spectra.names, spectra.shapes, spectra.values):
        z = normalise(S)
        rows.append({"name": short_name(name), "shape": list(shape), "rank": len(S),
                     "s_max": float(S[0]), "s_min": float(S[-1]),
                     "z_median": float(z.median()), "singular_values": [float(s) for s in S]})
    lines = [f"{'matrix':<16}{'shape':>12}{'rank':>6}{'s_max':>10}{'s_min':>10}{'z_median':>10}"]
    for r in rows:
        lines.append(f"{r['name']:<16}{'x'.join(map(str, r['shape'])):>12}{r['rank']:>6}"
                     f"{r['s_max']:>10.4g}{r['s_min']:>10.4g}{r['z_median']:>10.3f}")
    lines.append(f"{len(rows)} matrices; decomposed now: {spectra.decomposed}; model hash {spectra.model_hash[:16]}")
    emit({"model": args.model, "model_hash": spectra.model_hash, "decomposed": spectra.decomposed,
          "matrices": rows}, args.json, "\n".join(lines))
    return 0
