"""The memory-vs-time frontier (DESIGN §1): verdict lines and the PNG.

Each provider is a point (kept bytes, step time / eager) of one op in one run. A peer point is
*dominated* when some ckpt_ops point is at or below it on both axes. Bytes are the allocator's
kept bytes (``bench.common.kept_bytes``), which also see what selective AC caches outside the
saved-tensor hooks.
"""
from __future__ import annotations

import struct
import zlib
from typing import Dict, List, Optional, Tuple

from bench.common import Result, ratio_noise
from bench.providers import PEERS


def _points(results: List[Result]) -> Dict[str, List[Result]]:
    """Results of the frontier mode ("step" if measured) grouped by op, in run order."""
    modes = {r.mode for r in results}
    mode = "step" if "step" in modes else sorted(modes)[0]
    out: Dict[str, List[Result]] = {}
    for r in results:
        if r.mode == mode:
            out.setdefault(r.op, []).append(r)
    return out


def _level(r: Result) -> str:
    return r.provider[len("ckpt_ops "):] if r.provider.startswith("ckpt_ops ") else r.provider


def _noise(r: Result) -> float:
    """Half the p20-p80 spread of a point's per-round time ratios (else of its step times), relative
    to the median."""
    noise = ratio_noise(r)
    if noise is not None:
        return noise
    return (r.p80_ms - r.p20_ms) / (2.0 * r.median_ms) if r.median_ms > 0 else 0.0


def _noise_note(margin: float, ours: Result, peer: Result) -> str:
    """A warning when the time margin (either sign) is inside the two points' timing noise: the
    verdict could flip on a re-run. (The baseline's own per-round ratios are all 1: its noise
    enters every other point's ratios.)"""
    noise = max(_noise(ours), _noise(peer))
    return f" [time margin {abs(margin):.1%} within the timing noise +-{noise:.1%}]" if abs(margin) < noise else ""


def verdicts(results: List[Result]) -> List[str]:
    """One line per (op, peer): dominated by which ckpt_ops point, or by how much the closest misses;
    flagged when the time margin is inside the timing noise (p20-p80) of the run."""
    lines = []
    for op, rs in _points(results).items():
        ours = [r for r in rs if r.group == "ckpt_ops"]
        for peer in PEERS:
            p = next((r for r in rs if r.provider == peer), None)
            head = f"{op} | {peer}:"
            if p is None:
                lines.append(f"{head} not measured (skipped in this run)")
                continue
            if p.invalid:
                lines.append(f"{head} INVALID peer, not a frontier point: {p.invalid}")
                continue
            if not ours:
                lines.append(f"{head} NOT dominated: no ckpt_ops point was measured")
                continue
            pb, pt = p.kept_ratio, p.ratio_to_eager
            # excess over the peer on each axis, relative to it (<= 0 means at or below)
            def excess(r: Result) -> Tuple[float, float]:
                return r.kept_ratio / max(pb, 1e-12) - 1.0, r.ratio_to_eager / max(pt, 1e-12) - 1.0
            dom = [r for r in ours if r.kept_ratio <= pb and r.ratio_to_eager <= pt]
            if dom:
                best = min(dom, key=lambda r: max(excess(r)))
                lines.append(f"{head} dominated by ckpt_ops {_level(best)}: bytes {best.kept_ratio:.2f} <= {pb:.2f}, "
                             f"time {best.ratio_to_eager:.3f} <= {pt:.3f}" + _noise_note(excess(best)[1], best, p))
            else:
                best = min(ours, key=lambda r: max(excess(r)))
                eb, et = excess(best)
                miss = [f"{name} {v:+.1%} ({ours_v:.3f} > {peer_v:.3f})"
                        for name, v, ours_v, peer_v in (("bytes", eb, best.kept_ratio, pb),
                                                         ("time", et, best.ratio_to_eager, pt)) if v > 0]
                note = _noise_note(et, best, p) if eb <= 0 else ""
                lines.append(f"{head} NOT dominated: closest ckpt_ops point {_level(best)} (bytes "
                             f"{best.kept_ratio:.2f}, time {best.ratio_to_eager:.3f}), misses by {', '.join(miss)}{note}")
    return lines


_PEER_STYLE = {"eager": ("X", "black"), "torch.utils.checkpoint": ("o", "tab:blue"),
               "selective AC (matmuls)": ("D", "tab:orange"), "compile budget 0.5": ("^", "tab:green"),
               "compile budget 0.1": ("v", "tab:olive")}
_LEVEL_COLORS = {"full": "tab:red", "keep_attn": "tab:purple", "keep_mlp": "tab:cyan", "selective": "tab:brown",
                 "none": "tab:pink"}


def _style(r: Result) -> Tuple[str, str]:
    if r.group != "ckpt_ops":  # eager, peers and compiled peers
        return _PEER_STYLE.get(r.provider, ("o", "gray"))
    level = _level(r).split(" [")[0]
    return "s" if "[" in r.provider else "P", _LEVEL_COLORS.get(level, "tab:cyan")


def plot(results: List[Result], path: str, title: str = "") -> Optional[str]:
    """Write the frontier PNG (one panel per op). Returns a note when matplotlib is missing and
    the unlabeled fallback renderer was used, else None."""
    groups = _points(results)
    try:
        import matplotlib
    except ImportError:
        _plot_fallback(groups, path)
        return "matplotlib is not installed: wrote an unlabeled fallback PNG (markers only; see the table)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 5), squeeze=False)
    for ax, (op, rs) in zip(axes[0], groups.items()):
        xmax = max(r.kept_bytes for r in rs) / 1e6 * 1.1 + 1e-9
        ymax = max(r.ratio_to_eager for r in rs) * 1.1
        for r in rs:  # the region each ckpt_ops point dominates (up and right of it)
            if r.group == "ckpt_ops":
                ax.fill_between([r.kept_bytes / 1e6, xmax], r.ratio_to_eager, ymax, color="tab:red", alpha=0.04,
                                linewidth=0)
        for r in rs:
            marker, color = _style(r)
            ax.scatter(r.kept_bytes / 1e6, r.ratio_to_eager, marker=marker, color="lightgray" if r.invalid else color,
                       s=70, label=r.provider + (" (wrong gradients)" if r.invalid else ""),
                       edgecolors="black" if r.group == "ckpt_ops" else None, zorder=3)
        ax.set_xlim(0, xmax)
        ax.set_ylim(min(r.ratio_to_eager for r in rs) * 0.9, ymax)
        ax.set_xlabel("kept bytes for backward (MB, allocator)")
        ax.set_ylabel("step time / eager (same run)")
        ax.set_title(op, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _plot_fallback(groups: Dict[str, List[Result]], path: str, w: int = 480, h: int = 360) -> None:
    """Markers on axes, no text: a plain numpy + zlib PNG writer for machines without matplotlib."""
    import numpy as np

    colors = {"black": (0, 0, 0), "tab:blue": (31, 119, 180), "tab:orange": (255, 127, 14),
              "tab:green": (44, 160, 44), "tab:olive": (188, 189, 34), "tab:red": (214, 39, 40),
              "tab:purple": (148, 103, 189), "tab:brown": (140, 86, 75), "tab:pink": (227, 119, 194),
              "tab:cyan": (23, 190, 207), "gray": (127, 127, 127)}
    panels = []
    for rs in groups.values():
        img = np.full((h, w, 3), 255, np.uint8)
        m = 30
        img[h - m, m:w - m] = 0
        img[m:h - m, m] = 0
        xmax = max(r.kept_bytes for r in rs) * 1.1 or 1.0
        ymax = max(r.ratio_to_eager for r in rs) * 1.1 or 1.0
        for r in rs:
            marker, color = _style(r)
            cx = int(m + (w - 2 * m) * r.kept_bytes / xmax)
            cy = int(h - m - (h - 2 * m) * r.ratio_to_eager / ymax)
            yy, xx = np.mgrid[-5:6, -5:6]
            shape = (abs(xx) <= 4) & (abs(yy) <= 4) if marker in "sP" else (xx ** 2 + yy ** 2 <= 20)
            ys, xs = np.clip(cy + yy[shape], 0, h - 1), np.clip(cx + xx[shape], 0, w - 1)
            img[ys, xs] = colors.get(color, (127, 127, 127))
        panels.append(img)
    img = np.concatenate(panels, axis=1)
    raw = b"".join(b"\x00" + row.tobytes() for row in img)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", img.shape[1], img.shape[0], 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
