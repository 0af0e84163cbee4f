"""Train the tiny JumpReLU SAEs and transcoder shipped beside the embedded model
(trt_gemma/assets/gemma2-pydoc-tiny-scope-{res,att,mlp,transcoders}/), one --site at a time.

Activations: the embedded model's values at the site (trt_gemma.scope SITES; ReferenceModel.activations: the residual
after block --layer, the attention heads' outputs before o_proj, the post-feedforward-normed MLP output, or for the
transcoder the pre-feedforward norm before its gain -> the MLP output) over the shipped corpus: calib.txt to train,
eval.txt held out for the card. Rows of --seq-len tokens, each prefixed with <bos>; the <bos> position is dropped, as
Gemma Scope does.

Objective: Gemma Scope's JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead", arXiv 2407.14435; Lieberum et al.
2024, arXiv 2408.05147): loss = ||x - x_hat||^2 + lambda * L0(f), with f = relu(pre) * H(pre - theta), trained through
straight-through estimators with a rectangle kernel of bandwidth eps for the threshold (the same estimators as
jbloomAus/SAELens `sae_lens/saes/jumprelu_sae.py`, sae-lens 6.54.12); a transcoder's loss reconstructs the MLP
output instead of its input. Inputs (and a transcoder's targets) are scaled to mean squared norm d during training
(as Gemma Scope did) and the scales are folded into W_enc, W_dec and b_dec afterwards, so the saved params.npz reads
raw activations in Gemma Scope's layout.

    OMP_NUM_THREADS=1 python scripts/train_embedded_sae.py --site res|att|mlp|transcoder
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SEED = 1234
# dictionary width per site: the residual SAE was the first (1.6 MB); the others stay near 400 KB in the package
D_SAE = {"res": 768, "att": 128, "mlp": 192, "transcoder": 192}


@dataclass(frozen=True)
class Args:
    site: str = "res"
    layer: int = 2
    d_sae: int = 768
    steps: int = 3000
    batch: int = 1024
    lr: float = 1e-3
    l0_coeff: float = 0.3  # lambda: trades reconstruction against L0
    bandwidth: float = 0.05  # eps of the rectangle kernel (inputs normalised to mean squared norm d_model)
    init_threshold: float = 0.1
    seq_len: int = 256


def activation_rows(model, tok, text: str, layer: int, seq_len: int, site) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) at the site over `text`: the same array twice for an SAE."""
    ids = tok.encode(text, add_bos=False)
    rows = [ids[i:i + seq_len - 1] for i in range(0, len(ids), seq_len - 1)]
    taps = tuple(dict.fromkeys((site.tap, site.target_tap)))
    acts = [model.activations([tok.bos_id, *r], layer, taps) for r in rows if r]
    x, y = (np.concatenate([a[t][1:] for a in acts], axis=0) for t in (site.tap, site.target_tap))
    return x, y


def _rms_scale(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.sum(x.astype(np.float64) ** 2, axis=1)) / x.shape[1]))


def train(x: np.ndarray, y: np.ndarray, a: Args, log):
    import torch

    torch.manual_seed(SEED)
    d = y.shape[1]
    scale, scale_out = _rms_scale(x), _rms_scale(y)
    xt, yt = torch.from_numpy(x / scale).float(), torch.from_numpy(y / scale_out).float()

    class Step(torch.autograd.Function):  # H(pre - theta); d/dtheta through the rectangle kernel
        @staticmethod
        def forward(ctx, pre, theta):
            ctx.save_for_backward(pre, theta)
            return (pre > theta).float()

        @staticmethod
        def backward(ctx, g):
            pre, theta = ctx.saved_tensors
            k = ((pre - theta).abs() < a.bandwidth / 2).float() / a.bandwidth
            return None, (-k * g).sum(0)

    class JumpReLU(torch.autograd.Function):  # pre * H(pre - theta); d/dtheta = -theta/eps * K
        @staticmethod
        def forward(ctx, pre, theta):
            ctx.save_for_backward(pre, theta)
            return pre * (pre > theta).float()

        @staticmethod
        def backward(ctx, g):
            pre, theta = ctx.saved_tensors
            k = ((pre - theta).abs() < a.bandwidth / 2).float() / a.bandwidth
            return (pre > theta).float() * g, (-theta * k * g).sum(0)

    W_dec = torch.randn(a.d_sae, d)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)  # unit decoder rows, W_enc = W_dec^T (Gemma Scope init)
    if xt.shape[1] == d:
        W_enc = W_dec.T.clone()
    else:  # a transcoder between widths: unit random encoder columns
        W_enc = torch.nn.functional.normalize(torch.randn(xt.shape[1], a.d_sae), dim=0)
    p = {"W_enc": torch.nn.Parameter(W_enc), "W_dec": torch.nn.Parameter(W_dec),
         "b_enc": torch.nn.Parameter(torch.zeros(a.d_sae)), "b_dec": torch.nn.Parameter(yt.mean(0).clone()),
         "log_threshold": torch.nn.Parameter(torch.full((a.d_sae,), float(np.log(a.init_threshold))))}
    opt = torch.optim.Adam(p.values(), lr=a.lr, betas=(0.0, 0.999))
    gen = torch.Generator().manual_seed(SEED)
    for step in range(1, a.steps + 1):
        rows = torch.randint(0, xt.shape[0], (a.batch,), generator=gen)
        xb, yb = xt[rows], yt[rows]
        theta = p["log_threshold"].exp()
        pre = torch.relu(xb @ p["W_enc"] + p["b_enc"])
        f = JumpReLU.apply(pre, theta)
        recon = ((f @ p["W_dec"] + p["b_dec"] - yb) ** 2).sum(-1).mean()
        l0 = Step.apply(pre, theta).sum(-1).mean()
        coeff = a.l0_coeff * min(1.0, step / (0.1 * a.steps))  # lambda warm-up over the first 10 %
        loss = recon + coeff * l0
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(p.values(), 1.0)
        opt.step()
        if step % 500 == 0 or step == 1:
            log(f"step {step}: recon {recon.item():.3f} (of {d}) L0 {l0.item():.1f}")
    with torch.no_grad():
        out = {"W_enc": (p["W_enc"] / scale), "W_dec": p["W_dec"] * scale_out, "b_enc": p["b_enc"],
               "b_dec": p["b_dec"] * scale_out, "threshold": p["log_threshold"].exp()}
        return {k: v.detach().numpy().astype(np.float32) for k, v in out.items()}, scale


CARD = """# {name}: a JumpReLU {kind} for the embedded model

A Gemma Scope-format {kind} (`params.npz`: W_enc, W_dec, b_enc, b_dec, threshold, float32) on gemma2-pydoc-tiny at
the `{site}` site: {what} (SAELens `{hooks}`; docs/scope.md). `trt-gemma features --site {site} --layer {layer}
--text ...` uses it by default. A demo of the mechanism on a 4.6 M-parameter model, not an interpretability result.

- Path: `{path}/params.npz` ({nbytes:,} bytes); d_in {d_in}, d_out {d_out}, d_sae {d_sae}.
- Training data: activations of the embedded model over its shipped `calib.txt` ({train_tokens:,} tokens, <bos>
  positions dropped); held out: `eval.txt` ({eval_tokens:,} tokens). Both texts are CPython documentation
  (PSF license, see the model's LICENSE-DATA.txt).
- Objective: reconstruction MSE + lambda x L0 with JumpReLU straight-through estimators (Rajamanoharan et al. 2024);
  inputs scaled by 1/{scale:.4f} during training, folded back into the saved weights. Settings: {args}.
- Seed {seed}; torch {torch} on CPU, 1 thread; {seconds:.0f} s.

## Held-out quality (eval.txt)
- L0 (features with f > 0 per token, mean): {l0:.2f}
- Fraction of variance explained (1 - sum||x - x_hat||^2 / sum||x - mean x||^2): {fve:.4f}
- Mean relative reconstruction error ||x - x_hat|| / ||x||: {rel:.4f}
- Dead features (never active on held-out text): {dead} of {d_sae}
- Same metrics on the training text: L0 {train_l0:.2f}, variance explained {train_fve:.4f}

## Reproduce
    OMP_NUM_THREADS=1 python scripts/train_embedded_sae.py --site {site}
"""


def main(argv=None) -> None:
    import torch

    from trt_gemma.assets import calib_text_path, default_model_dir, eval_text_path
    from trt_gemma.fsutil import atomic_output_dir
    from trt_gemma.reference import ReferenceModel
    from trt_gemma.runtime.backends import reference_checkpoint
    from trt_gemma.runtime.tokenizer import GemmaTokenizer
    from trt_gemma.scope import ASSET_PREFIX, SITES, JumpReLUSAE, fvu

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--site", choices=list(SITES), default=Args.site)
    ap.add_argument("--out", type=Path, default=None, help="default: trt_gemma/assets/gemma2-pydoc-tiny-scope-SITE")
    ap.add_argument("--steps", type=int, default=Args.steps)
    ap.add_argument("--l0-coeff", type=float, default=Args.l0_coeff)
    ns = ap.parse_args(argv)
    site = SITES[ns.site]
    a = Args(site=ns.site, d_sae=D_SAE[ns.site], steps=ns.steps, l0_coeff=ns.l0_coeff)
    out_dir = ns.out or REPO / "trt_gemma" / "assets" / (ASSET_PREFIX + site.suffix)
    torch.set_num_threads(1)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    ckpt = reference_checkpoint(default_model_dir())
    model, tok = ReferenceModel.load(ckpt), GemmaTokenizer.from_dir(ckpt)
    x_train, y_train = activation_rows(model, tok, calib_text_path().read_text(), a.layer, a.seq_len, site)
    x_eval, y_eval = activation_rows(model, tok, eval_text_path().read_text(), a.layer, a.seq_len, site)
    log(f"{site.name} activations: train {x_train.shape} -> {y_train.shape}, held-out {x_eval.shape}")
    t0 = time.time()
    params, scale = train(x_train, y_train, a, log)
    seconds = time.time() - t0
    sae = JumpReLUSAE.from_arrays(params, "trained", site)

    def metrics(x, y):
        f = sae.encode(x)
        yh = sae.decode(f)
        rel = np.linalg.norm(y - yh, axis=1) / np.linalg.norm(y, axis=1)
        return float(np.count_nonzero(f, axis=1).mean()), 1 - fvu(y, yh), float(rel.mean()), f

    l0, fve, rel, f_eval = metrics(x_eval, y_eval)
    train_l0, train_fve, _, _ = metrics(x_train, y_train)
    rel_dir = Path(f"layer_{a.layer}") / f"width_{a.d_sae}" / f"average_l0_{round(l0)}"
    with atomic_output_dir(out_dir, force=True) as tmp:
        (tmp / rel_dir).mkdir(parents=True)
        np.savez(tmp / rel_dir / "params.npz", **params)
        nbytes = (tmp / rel_dir / "params.npz").stat().st_size
        (tmp / "SAE_CARD.md").write_text(CARD.format(
            name=out_dir.name, kind="transcoder" if site.tap_out else "sparse autoencoder", site=site.name,
            what=site.what.format(layer=a.layer), hooks=site.hooks(a.layer), layer=a.layer,
            path=rel_dir.as_posix(), nbytes=nbytes, d_in=sae.d_in, d_out=sae.d_out,
            d_sae=a.d_sae, train_tokens=len(x_train), eval_tokens=len(x_eval), scale=scale,
            args=", ".join(f"{k}={v}" for k, v in asdict(a).items()), seed=SEED, torch=torch.__version__,
            seconds=seconds, l0=l0, fve=fve, rel=rel, dead=int(np.sum(f_eval.max(0) == 0)), train_l0=train_l0,
            train_fve=train_fve))
        for p in tmp.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        tmp.chmod(0o755)
    log(f"held-out L0 {l0:.2f}, variance explained {fve:.4f}, rel error {rel:.4f}; wrote {out_dir / rel_dir}")


if __name__ == "__main__":
    main()
