"""Issue 21 diagnosis: a run's val pseudo masks under several inference settings (GT tags, no CRF), with the raw
per-patch softmax of the background and of the tagged class on GT background vs GT object pixels.
usage: python benchmarks/transfer_diag.py RUN DATA [N] [size:scales[:normalise[:absent]] ...], e.g. 0:1.5,2 or 128:1
or 0:1.5,2:full:background (infer.absent)."""
# ruff: noqa: E401, E702, E501, I001  (a terse diagnostic script)
import sys, numpy as np, torch
from wsss.engine.inference import load_run, seed_probs, seed_mask, eval_transform
from wsss.data import open_dataset
from wsss.evaluation.metrics import ConfusionMatrix
torch.set_num_threads(1)
run, root = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 60
settings = sys.argv[4:] or ["0:1.5,2"]
cfg, method, names = load_run(run, None, "cpu")
ds = open_dataset(root, "val")
for st in settings:
    size, scales, *norm = st.split(":")
    cfg.infer.size = int(size); cfg.infer.scales = [float(s) for s in scales.split(",")]
    cfg.infer.normalise = norm[0] if norm else "full"
    cfg.infer.absent = norm[1] if len(norm) > 1 else "drop"
    cmraw = ConfusionMatrix(ds.num_classes)
    tf = eval_transform(cfg)
    cm = ConfusionMatrix(ds.num_classes)
    fgp = fgg = tot = 0; z0_bg = []; z0_fg = []; zc_bg = []; zc_fg = []; rows = []
    for i in range(min(n, len(ds))):
        s = ds[i]
        x = tf(s, ds.num_classes)["image"]
        keep, probs = seed_probs(method, x, s.tags, cfg.infer, (s.image.height, s.image.width))
        m = seed_mask(keep, probs)
        gt = np.asarray(s.mask); lab = gt != 255
        with torch.no_grad():  # raw: the averaged softmax of the kept classes, no max-normalisation
            acc = 0
            for sc in cfg.infer.scales:
                xs = torch.nn.functional.interpolate(x[None], scale_factor=sc, mode="bilinear")
                acc = acc + torch.nn.functional.interpolate(method.class_maps(xs)[:, keep], size=gt.shape, mode="bilinear")[0]
            raw = np.asarray(keep, np.uint8)[acc.argmax(0).numpy()]
        cmraw.update(torch.from_numpy(raw), torch.from_numpy(gt.copy()))
        cm.update(torch.from_numpy(m), torch.from_numpy(gt.copy()))
        fgp += ((m > 0) & lab).sum(); fgg += ((gt > 0) & lab).sum(); tot += lab.sum()
        with torch.no_grad():  # raw Z at the first scale, upsampled
            xs = torch.nn.functional.interpolate(x[None], scale_factor=cfg.infer.scales[0], mode="bilinear")
            z = method.class_maps(xs)[0]
            z = torch.nn.functional.interpolate(z[None], size=gt.shape, mode="bilinear")[0].numpy()
        z0_bg.append(z[0][gt == 0].mean()); z0_fg.append(z[0][(gt > 0) & lab].mean())
        zc_bg.append(max(z[c][gt == 0].mean() for c in s.tags)); zc_fg.append(np.mean([z[c][gt == c].mean() for c in s.tags if (gt == c).any()]))
        bgn = probs[0].numpy(); rows.append(np.unravel_index(bgn.argmax(), bgn.shape)[0] / bgn.shape[0])
    r = cm.compute()
    print(f"{run} size={size} scales={scales} {cfg.infer.normalise} absent={cfg.infer.absent}: mIoU {r['miou']:.3f}  pred fg {fgp/tot:.2f} gt fg {fgg/tot:.2f}  "
          f"rawZ0 on gt-bg {np.mean(z0_bg):.2f} on gt-fg {np.mean(z0_fg):.2f}  rawZ(tag) on gt-bg {np.mean(zc_bg):.2f} on its own gt pixels {np.nanmean(zc_fg):.2f}  "
          f"bg-max row (0=top) median {np.median(rows):.2f}  bg IoU {r['iou'][0]:.2f}  raw-argmax mIoU {cmraw.compute()['miou']:.3f}", flush=True)
