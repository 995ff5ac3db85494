"""The README's main job, on the embedded default and the bundled sample images.

    python -m core.demo OUT_DIR

1. writes the bundled sample set (scikit-image's images, small) to OUT_DIR/sample;
2. evaluates bicubic on it;
3. compresses a teacher into a compact model: the real RLFN-S ×2 from ../shared/weights when present,
   else a briefly trained rlfn_s (a random teacher would teach nothing);
4. upscales a sample image with the compact model.
Small iteration counts: it shows every stage and artifact in a few minutes on a 2-core CPU; the
numbers are not those of a full run (see bench/quality.py for that).
"""

from __future__ import annotations

import sys
from pathlib import Path

from core.cli import main as cli

SHARED_TEACHER = Path(__file__).resolve().parents[1].parent / "shared" / "weights" / "RLFN_s_x2.pth"


def run(out: Path) -> int:
    from core.data.sample import sample_dir

    out.mkdir(parents=True, exist_ok=True)
    sample = sample_dir(out / "cache")
    print(f"sample images: {sample}")
    steps = [["eval", "bicubic", "--scale", "2", "--data", str(sample)]]
    teacher = SHARED_TEACHER
    if not teacher.exists():
        print("../shared/weights absent: training a small rlfn_s teacher on the sample images first")
        steps.append(
            [
                "train",
                "rlfn_s",
                "--scale",
                "2",
                "--train",
                str(sample),
                "--val",
                str(sample),
                "--iters",
                "200",
                "--batch-size",
                "8",
                "--out",
                str(out / "teacher"),
                "--resume",
            ]
        )
        teacher = out / "teacher" / "model"
    steps.append(
        [
            "compress",
            "rlfn_s",
            "--scale",
            "2",
            "--teacher",
            str(teacher),
            "--train",
            str(sample),
            "--val",
            str(sample),
            "--target-params",
            "45000",
            "--prune-iters",
            "20",
            "--distill-iters",
            "300",
            "--batch-size",
            "8",
            "--validate-every",
            "100",
            "--out",
            str(out / "job"),
            "--resume",
        ]
    )
    image = next(sample.glob("*.png"))
    steps.append(
        [
            "upscale",
            "rlfn_s",
            "--scale",
            "2",
            "--weights",
            str(out / "job" / "out"),
            str(image),
            str(out / f"{image.stem}_x2.png"),
        ]
    )
    for step in steps:
        print("\n$ srcompress " + " ".join(step))
        if (code := cli(step)) != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")))
